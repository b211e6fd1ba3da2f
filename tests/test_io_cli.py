"""Saving and loading without pickle (exact round trips, clear errors), and the fxprune command."""
import json

import pytest
import timm
import torch

import fxprune
from fxprune.cli import main as cli
from helpers import randomize

ARGS = {"img_size": 32, "patch_size": 8, "depth": 2}


def _deit():
    return randomize(timm.create_model("deit_tiny_patch16_224", **ARGS)).eval()


def _swin():
    return randomize(timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
                                       embed_dim=16, depths=(2, 2), num_heads=(2, 4))).eval()


def _flatten():
    return randomize(timm.create_model("flatten_deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                                       num_heads=2, depth=2)).eval()


@pytest.mark.parametrize("build,options", [(_deit, dict(head_ratio=0.34)), (_swin, dict(head_ratio=0.5)),
                                           (_flatten, dict(head_ratio=0.5, untie_shared_convs=True)),
                                           (_deit, dict(head_ratio=0.34, compensation="reweight"))],
                         ids=["deit", "swin", "flatten", "deit-reweight-nodes"])
def test_round_trip_is_bit_identical(tmp_path, build, options):
    model = build()
    x = torch.randn(1, 3, 32, 32)
    pruned = fxprune.prune(model, 0.5, example_inputs=(x,), reweight_data=[torch.randn(4, 3, 32, 32)], **options)
    fxprune.save(pruned, tmp_path / "saved")
    loaded = fxprune.load(tmp_path / "saved", model=model)
    batch = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(batch), pruned(batch))
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["plan.json", "weights.safetensors"]


def test_load_by_recorded_architecture_and_errors(tmp_path):
    model = _deit()
    pruned = fxprune.prune(model, 0.5, example_inputs=(torch.randn(1, 3, 32, 32),))
    target = tmp_path / "saved"
    fxprune.save(pruned, target, model_args=ARGS)
    torch.manual_seed(1)
    loaded = fxprune.load(target)  # rebuilt from the recorded timm name and arguments
    assert loaded.state_dict().keys() == pruned.state_dict().keys()
    with pytest.raises(fxprune.FxpruneError, match="not empty"):
        fxprune.save(pruned, target)
    with pytest.raises(fxprune.LoadError, match="another architecture"):
        fxprune.load(target, model=randomize(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8,
                                                               depth=3)))
    record = json.loads((target / "plan.json").read_text())
    record["version"] = 99
    (target / "plan.json").write_text(json.dumps(record))
    with pytest.raises(fxprune.LoadError, match="version"):
        fxprune.load(target, model=model)
    record["version"] = 1
    (target / "plan.json").write_text(json.dumps(record))
    weights = (target / "weights.safetensors").read_bytes()
    (target / "weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(fxprune.LoadError, match="damaged"):
        fxprune.load(target, model=model)
    (target / "plan.json").write_text("{not json")
    with pytest.raises(fxprune.LoadError, match="damaged"):
        fxprune.load(target, model=model)
    with pytest.raises(fxprune.LoadError, match="plan.json"):
        fxprune.load(tmp_path / "nothing_here", model=model)


def test_failed_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    pruned = fxprune.prune(_deit(), 0.5, example_inputs=(torch.randn(1, 3, 32, 32),))
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        fxprune.save(pruned, tmp_path / "saved")
    assert not (tmp_path / "saved").exists() and not list(tmp_path.iterdir())


def test_cli_prune_inspect_bench(tmp_path, capsys):
    args = ["--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "depth=2"]
    out = tmp_path / "pruned"
    assert cli(["prune", "deit_tiny_patch16_224", *args, "--ratio", "0.5", "--head-ratio", "0.34",
                "--out", str(out), "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "original" in printed and "pruned" in printed and "saved to" in printed
    assert cli(["bench", str(out), "--batches", "1", "2", "--repeats", "1", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["params"] < 5e6
    assert cli(["inspect", "deit_tiny_patch16_224", *args]) == 0
    printed = capsys.readouterr().out
    assert "blocks.1.attn.qkv:heads" in printed and "share of the MACs" in printed
    assert "of the MACs can be removed (qk, v, mlp)" in printed
    deep = tmp_path / "depth"  # whole residual branches from the command line, saved and benchmarked back
    assert cli(["prune", "deit_tiny_patch16_224", *args, "--ratio", "0.5", "--kinds", "depth", "mlp",
                "--out", str(deep), "--repeats", "1"]) == 0
    assert json.loads((deep / "plan.json").read_text())["plan"]["branches"]
    assert cli(["bench", str(deep), "--batches", "1", "--repeats", "1"]) == 0
    timed = tmp_path / "timed"  # a latency budget from the command line: the plan says so
    assert cli(["prune", "deit_tiny_patch16_224", *args, "--target-latency", "0.9", "--out", str(timed),
                "--repeats", "1"]) == 0
    assert json.loads((timed / "plan.json").read_text())["plan"]["options"]["budget"] == "latency"
    assert cli(["prune", "no_such_model", "--ratio", "0.5"]) == 2
    assert "neither a saved fxprune directory" in capsys.readouterr().err
    assert cli(["prune", "deit_tiny_patch16_224", *args, "--ratio", "1.5"]) == 2


def test_checkpoints_load_from_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    from fxprune.io import read_checkpoint

    model = _deit()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save({"model": state}, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        loaded = read_checkpoint(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
        args = [f"--model-arg={k}={v}" for k, v in ARGS.items()]
        assert cli(["prune", "deit_tiny_patch16_224", *args, "--ratio", "0.5", "--repeats", "1",
                    "--checkpoint", str(tmp_path / name)]) == 0
