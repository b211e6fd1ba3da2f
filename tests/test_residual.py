"""Residual width (kinds=("residual",)): the residual stream's channels removed everywhere it is read or written.

The reference is activation level: a LayerNorm over the stream normalises over the kept channels only (and
outputs zero for the removed ones). The tests build that reference independently of fxprune: the timm model
itself, each stream norm replaced by LayerNorm over the kept channels, the kept channels read off the pruned
model's norm weights.
"""
import copy
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxprune
from fxprune.cli import main as cli
from fxprune.errors import RewriteError
from fxprune.masked_reference import norm_over_kept
from fxprune.importance.taylor import main_output
from fxprune.verify import masked
from helpers import assert_unchanged, examples, randomize, small_vit, state_snapshot
from test_swin_property import build_swin, swin_configs
from test_vit_property import vit_configs

KIND_SETS = [("residual",), ("residual", "qk", "v", "mlp")]


def _kept(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Indices of ``original`` (1-D, distinct values) that ``pruned`` kept, in order."""
    return torch.tensor([int(torch.nonzero(original == v)[0]) for v in pruned])


def _kept_mask(original: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(len(original), dtype=torch.bool)
    mask[_kept(original, pruned)] = True
    return mask


def _layer_norm_over(module: nn.LayerNorm, kept: torch.Tensor):
    """LayerNorm over the ``kept`` channels of the last dim (the others zero): what the pruned norm computes."""
    def forward(x):
        y = torch.zeros_like(x)
        y[..., kept] = F.layer_norm(x[..., kept], (int(kept.sum()),), module.weight[kept], module.bias[kept], module.eps)
        return y
    return forward


def _weights_zeroed(model, analysis, plan):
    """A copy of the timm model itself with the plan's removed channels' weights zeroed (its modules intact, so
    their norms can be replaced; ``fxprune.mask`` gives fxprune's own graph for a plan that narrows a stream)."""
    reference = masked(model, analysis, plan)
    assert type(reference) is type(model)
    return reference


def _zero_input(kept: torch.Tensor):
    return lambda _module, args: (torch.where(kept, args[0], 0), *args[1:])


def vit_reference(model, analysis, plan, pruned):
    """The ViT with the plan's other channels zeroed (weights) and every norm over the stream normalising over
    the channels ``pruned`` kept. The stream is read only by those norms (and residual adds), so its removed
    channels need no zeroing."""
    kept = _kept_mask(model.blocks[0].norm1.weight.detach(), pruned.get_parameter("blocks.0.norm1.weight").detach())
    reference = _weights_zeroed(model, analysis, plan)
    for name, module in reference.named_modules():
        if isinstance(module, nn.LayerNorm) and not name.endswith(("q_norm", "k_norm")):
            module.forward = _layer_norm_over(module, kept)
    assert "forward" in vars(reference.blocks[0].norm1)  # the model's own norms, not a traced graph's calls
    return reference, kept


def swin_reference(model, analysis, plan, pruned):
    """The Swin model with the plan's other channels zeroed (weights) and each stage's stream norms normalising
    over the channels ``pruned`` kept in that stage; patch merging's norm (Swin) over its 4 copies of the
    previous stage's; its reduction reads those copies only (Swin-v2 reduces first, then norms the new stream)."""
    stages = [_kept_mask(stage.blocks[0].norm1.weight.detach(),
                         pruned.get_parameter(f"layers.{i}.blocks.0.norm1.weight").detach())
              for i, stage in enumerate(model.layers)]
    reference = _weights_zeroed(model, analysis, plan)
    for name, module in reference.named_modules():
        if not isinstance(module, nn.LayerNorm):
            continue
        parts = name.split(".")
        stage = int(parts[1]) if parts[0] == "layers" else (0 if parts[0] == "patch_embed" else len(stages) - 1)
        kept = stages[stage]
        if "downsample" in parts and module.normalized_shape[0] != len(kept):
            kept = stages[stage - 1].repeat(4)  # (2, 2, C) flattened: the channel index runs fastest
        module.forward = _layer_norm_over(module, kept)
    for i, stage in enumerate(reference.layers):
        if i and not isinstance(stage.downsample, nn.Identity):
            stage.downsample.reduction.register_forward_pre_hook(_zero_input(stages[i - 1].repeat(4)))
    return reference, stages


def _close(pruned, reference, x) -> float:
    with torch.no_grad():
        return fxprune.relative_error(pruned(x), reference(x))


@settings(max_examples=examples(15), deadline=None)
@given(cfg=vit_configs(), ratio=st.floats(0.1, 0.9), kinds=st.sampled_from(KIND_SETS), batch=st.integers(2, 3))
def test_vit_residual_width_equals_layer_norm_over_kept_channels(cfg, ratio, kinds, batch):
    model = small_vit(**cfg)
    snapshot = state_snapshot(model)
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    (stream,) = [g for g in analysis.groups if g.kind == "residual"]
    assert stream.name == "patch_embed.proj:residual" and stream.prunable
    plan = fxprune.plan(analysis, ratio, kinds=kinds)
    pruned = fxprune.apply(analysis, plan)
    reference, kept = vit_reference(model, analysis, plan, pruned)
    width = cfg["embed_per_head"] * cfg["num_heads"]
    assert int(kept.sum()) == width - min(int(ratio * width + 1e-9), width - 1)
    assert _close(pruned, reference, torch.randn(batch, 3, 16, 16)) < 1e-5
    embed = int(kept.sum())  # every tensor that reads or writes the stream has the smaller width
    assert pruned.get_parameter("patch_embed.proj.weight").shape[0] == embed
    assert pruned.get_parameter("pos_embed").shape[-1] == embed
    for i in range(cfg["depth"]):
        assert pruned.get_parameter(f"blocks.{i}.attn.qkv.weight").shape[1] == embed
        assert pruned.get_parameter(f"blocks.{i}.attn.proj.weight").shape[0] == embed
        assert pruned.get_parameter(f"blocks.{i}.mlp.fc1.weight").shape[1] == embed
        assert pruned.get_parameter(f"blocks.{i}.mlp.fc2.weight").shape[0] == embed
        if cfg["init_values"]:
            assert pruned.get_parameter(f"blocks.{i}.ls1.gamma").shape == (embed,)
    for token in ("cls_token", "reg_token"):
        if getattr(model, token, None) is not None:
            assert pruned.get_parameter(token).shape[-1] == embed
    assert pruned.get_parameter("head.weight").shape[1] == embed
    assert fxprune.check_of(pruned).error < 1e-5
    assert_unchanged(model, snapshot)


@settings(max_examples=examples(8), deadline=None)
@given(cfg=swin_configs(), ratio=st.floats(0.1, 0.9), kinds=st.sampled_from(KIND_SETS), batch=st.integers(2, 3))
def test_swin_residual_width_per_stage_equals_layer_norm_over_kept_channels(cfg, ratio, kinds, batch):
    model = build_swin(cfg)
    size = cfg["img_size"]
    analysis = fxprune.analyze(model, (torch.randn(1, 3, size, size),))
    streams = [g for g in analysis.groups if g.kind == "residual"]
    stages = len(cfg["depths"])
    assert [g.name for g in streams] == ["patch_embed.proj:residual"] + [
        f"layers.{i}.downsample.reduction:residual" for i in range(1, stages)]
    assert all(g.prunable for g in streams)
    plan = fxprune.plan(analysis, ratio, kinds=kinds)
    pruned = fxprune.apply(analysis, plan)
    reference, kept = swin_reference(model, analysis, plan, pruned)
    for i, stage_kept in enumerate(kept):
        width = cfg["embed_dim"] * 2 ** i
        assert int(stage_kept.sum()) == width - min(int(ratio * width + 1e-9), width - 1)
    assert _close(pruned, reference, torch.randn(batch, 3, size, size)) < 1e-5


def test_residual_is_untouched_unless_asked():
    model = small_vit(class_token=True, reg_tokens=1, init_values=0.1)
    x = torch.randn(1, 3, 16, 16)
    pruned = fxprune.prune(model, 0.5, example_inputs=(x,))
    assert pruned.get_parameter("pos_embed").shape == model.pos_embed.shape
    assert pruned.get_parameter("blocks.0.norm1.weight").shape == (16,)
    plan = fxprune.plan(model, 0.5, example_inputs=(x,))
    assert "patch_embed.proj:residual" not in plan.removed
    assert fxprune.check_of(pruned).reference == "weights"


def test_one_norm_over_kept_channels_is_layer_norm_of_those_channels():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 5, 8), torch.randn(8), torch.randn(8)
    kept = torch.tensor([True, False, True, True, False, True, True, False])
    got = norm_over_kept(x, kept, weight, bias, 1e-6, rms=False)
    want = F.layer_norm(x[..., kept], (5,), weight[kept], bias[kept], 1e-6)
    torch.testing.assert_close(got[..., kept], want)
    assert torch.equal(got[..., ~kept], torch.zeros(3, 5, 3))
    x[..., ~kept] = float("inf")  # removed channels never reach the statistics
    torch.testing.assert_close(norm_over_kept(x, kept, weight, bias, 1e-6, rms=False)[..., kept], want)
    rms = norm_over_kept(x, kept, weight, None, 1e-6, rms=True)
    torch.testing.assert_close(rms[..., kept], F.rms_norm(x[..., kept], (5,), weight[kept], 1e-6))


def test_pruned_norm_is_a_layer_norm_over_the_kept_width():
    model = small_vit(num_heads=2, embed_per_head=8, depth=2)
    pruned = fxprune.prune(model, 0.25, kinds=("residual",), example_inputs=(torch.randn(1, 3, 16, 16),))
    sizes = [tuple(n.args[1] if len(n.args) > 1 else n.kwargs["normalized_shape"])
             for n in pruned.graph.nodes if n.target is F.layer_norm]
    assert sizes == [(12,)] * 5  # norm1 and norm2 of two blocks, the final norm


def _swin():
    return randomize(timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4,
                                       embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5)).eval()


@pytest.mark.parametrize("build", [lambda: small_vit(class_token=True, reg_tokens=1, init_values=0.1, depth=3), _swin],
                         ids=["vit", "swin"])
@pytest.mark.parametrize("budget", ["target_macs", "target_params"])
def test_budgets_count_what_narrowing_the_stream_removes(build, budget):
    model = build()
    size = 16 if isinstance(model, timm.models.VisionTransformer) else 32
    x = torch.randn(1, 3, size, size)
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.plan(analysis, kinds=("residual", "qk", "v", "mlp"), **{budget: 0.6})
    assert any(plan.removed.get(g.name) for g in analysis.groups if g.kind == "residual")
    pruned = fxprune.apply(analysis, plan)
    if budget == "target_macs":
        reached = fxprune.count_macs(pruned, (x,)) / fxprune.count_macs(model, (x,))
    else:
        reached = fxprune.count_params(pruned) / fxprune.count_params(model)
    assert reached == pytest.approx(plan.options["reached"], abs=1e-9)  # FlopCounter agrees with the estimate
    assert abs(reached - 0.6) < 0.05


@pytest.mark.parametrize("importance", ["l2", "l1", "random", "dimap", "taylor", "attention", "reconstruction"])
def test_every_criterion_scores_the_stream(importance):
    model = small_vit(init_values=0.1)
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    plan = fxprune.plan(analysis, 0.5, kinds=("residual",), importance=importance, data=[torch.randn(4, 3, 16, 16)])
    (removed,) = plan.removed["patch_embed.proj:residual"]
    assert len(removed) == 8
    if importance != "random":  # a real score: not the first positions, as tied scores would give
        assert removed != list(range(8))
    fxprune.apply(analysis, plan)


@pytest.mark.parametrize("compensation", ["least_squares", "sequential", "reweight"])
def test_compensation_runs_and_reduces_the_error(compensation):
    model = small_vit(init_values=0.1, depth=3, num_heads=3)
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    plan = fxprune.plan(analysis, 0.25, kinds=("residual", "qk", "v", "mlp"))
    data = [torch.randn(32, 3, 16, 16) for _ in range(4)]
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        plain = fxprune.relative_error(fxprune.apply(analysis, plan)(x), want)
        compensated = fxprune.apply(analysis, plan, reweight_data=data, compensation=compensation)
        assert fxprune.relative_error(compensated(x), want) < plain


def test_the_self_check_compares_with_norms_over_the_kept_channels(monkeypatch):
    """Against the weight-masked original alone (norm statistics over every channel) the narrowed model
    differs: the check would refuse a rewrite whose norms did not normalise over the kept channels."""
    import fxprune.rewrite as rewrite

    model = small_vit(init_values=0.1)
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 16, 16),))
    plan = fxprune.plan(analysis, 0.5, kinds=("residual",))
    fxprune.apply(analysis, plan)
    monkeypatch.setattr(rewrite, "kept_statistics", lambda analysis, removed: analysis)
    with pytest.raises(RewriteError, match="differs from the masked original"):
        fxprune.apply(analysis, plan)


@pytest.mark.parametrize("build", [lambda: small_vit(class_token=True, reg_tokens=2, init_values=0.1), _swin],
                         ids=["vit", "swin"])
def test_save_load_round_trip_is_bit_identical(tmp_path, build):
    model = build()
    size = 16 if isinstance(model, timm.models.VisionTransformer) else 32
    pruned = fxprune.prune(model, 0.5, kinds=("residual", "mlp"), example_inputs=(torch.randn(1, 3, size, size),))
    fxprune.save(pruned, tmp_path / "saved")
    loaded = fxprune.load(tmp_path / "saved", model=model)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert fxprune.Plan.from_json(fxprune.plan_of(pruned).to_json()).removed == fxprune.plan_of(loaded).removed


def test_cli_prunes_the_residual_width_and_inspect_lists_the_stream(tmp_path, capsys):
    args = ["--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "depth=2"]
    out = tmp_path / "narrow"
    assert cli(["prune", "deit_tiny_patch16_224", *args, "--ratio", "0.5", "--kinds", "residual",
                "--out", str(out), "--repeats", "1"]) == 0
    saved = json.loads((out / "plan.json").read_text())["plan"]["removed"]
    assert len(saved["patch_embed.proj:residual"][0]) == 96  # half of 192 channels
    loaded = fxprune.load(out)
    assert loaded.get_parameter("pos_embed").shape[-1] == 96
    assert cli(["inspect", "deit_tiny_patch16_224", *args]) == 0
    printed = capsys.readouterr().out
    assert "patch_embed.proj:residual" in printed and "residual=1" in printed


def test_norms_replaced_in_the_reference_are_the_model_own():
    """The independent reference really swaps the timm model's norms (not a graph's calls)."""
    model = _swin()
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 32, 32),))
    plan = fxprune.plan(analysis, 0.5, kinds=("residual",))
    reference, _ = swin_reference(model, analysis, plan, fxprune.apply(analysis, plan))
    norms = [m for m in reference.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all("forward" in vars(m) for m in norms)


@pytest.mark.parametrize("family,head", [("ViT", "ViTForImageClassification"), ("BERT", "BertForSequenceClassification"),
                                         ("DistilBERT", "DistilBertForSequenceClassification"),
                                         # its patch embedding is exported as aten.conv2d.padding ("valid")
                                         ("SigLIP-vision", "SiglipForImageClassification")])
def test_hugging_face_classifiers_equal_layer_norm_over_kept_channels(family, head):
    """A classifier's stream (a bare model's is its output, so it stays) narrows; every nn.LayerNorm of the hidden
    width, post-norm BERT's too, then normalises over the kept channels."""
    import transformers
    import hf_models

    kwargs = hf_models.FAMILIES[family].kwargs(hf_models.Arch())
    if head == "SiglipForImageClassification":  # a classifier over the vision tower of a vision-text config
        config = transformers.SiglipConfig(vision_config=kwargs, num_labels=3, attn_implementation="eager")
    else:
        config = getattr(transformers, hf_models.FAMILIES[family].config)(**kwargs, num_labels=3,
                                                                         attn_implementation="eager")
    model = hf_models.randomize(getattr(transformers, head)(config)).eval()
    config = getattr(config, "vision_config", config)
    generator = torch.Generator().manual_seed(0)
    analysis = fxprune.analyze(model, hf_models.inputs(family, 2, 8, generator))
    plan = fxprune.plan(analysis, 0.5, kinds=("residual",))
    pruned = fxprune.apply(analysis, plan)
    hidden = config.hidden_size if hasattr(config, "hidden_size") else config.dim
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.LayerNorm) and m.normalized_shape == (hidden,)}
    first = next(iter(norms))
    kept = _kept_mask(norms[first].weight.detach(), pruned.get_parameter(f"{first}.weight").detach())
    assert int(kept.sum()) == hidden // 2
    reference = copy.deepcopy(model)
    for name, module in reference.named_modules():
        if name in norms:
            module.forward = _layer_norm_over(module, kept)
    x = hf_models.inputs(family, 3, 8, generator)
    with torch.no_grad():
        got, want = main_output(pruned(*x)), main_output(reference(*x))
    assert fxprune.relative_error(got, want) < 1e-5


def test_export_graph_narrows_the_stream_like_the_symbolic_one():
    """torch.export's ATen graph (aten.layer_norm on get_attr weights) narrows the same stream, equal to the
    same independent reference."""
    from fxprune.analysis import analyze_captured
    from fxprune.capture import capture

    model = small_vit(class_token=True, init_values=0.1)
    analysis = analyze_captured(capture(model, (torch.randn(1, 3, 16, 16),), method="export"))
    assert [g.kind for g in analysis.groups].count("residual") == 1
    plan = fxprune.plan(analysis, 0.5, kinds=("residual", "qk", "v", "mlp"))
    pruned = fxprune.apply(analysis, plan)
    reference, kept = vit_reference(model, analysis, plan, pruned)
    assert int(kept.sum()) == 8
    assert _close(pruned, reference, torch.randn(3, 3, 16, 16)) < 1e-5


def test_depth_and_residual_width_together():
    """Whole branches and the stream's width under one budget: equal to the timm model whose removed branches
    output zero (hooks) and whose stream norms normalise over the kept channels."""
    model = small_vit(depth=3, init_values=0.1)
    x = torch.randn(1, 3, 16, 16)
    analysis = fxprune.analyze(model, (x,))
    plan = fxprune.plan(analysis, target_macs=0.5, kinds=("residual", "depth", "qk", "v", "mlp"),
                        data=[torch.randn(4, 3, 16, 16)])
    assert plan.branches and plan.removed.get("patch_embed.proj:residual")
    pruned = fxprune.apply(analysis, plan)
    assert fxprune.count_macs(pruned, (x,)) / fxprune.count_macs(model, (x,)) == pytest.approx(plan.options["reached"])
    reference, _ = vit_reference(model, analysis, plan, pruned)
    for name in plan.branches:
        path, kind = name.split(":")
        branch = reference.get_submodule(path).get_submodule("attn" if kind == "attention" else "mlp")
        branch.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    assert _close(pruned, reference, torch.randn(3, 3, 16, 16)) < 1e-5


def _rms_norm_over(module: nn.Module, kept: torch.Tensor):
    """Hugging Face's RMSNorm (float32 statistics, weight after the cast back) over the ``kept`` channels."""
    def forward(x):
        y = torch.zeros_like(x)
        h = x[..., kept].float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        y[..., kept] = module.weight[kept] * h.to(x.dtype)
        return y
    return forward


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@settings(max_examples=examples(2), deadline=None)
@given(family=st.sampled_from(["Llama", "Qwen2"]), layers=st.integers(1, 2), heads=st.sampled_from([2, 4]),
       kv_groups=st.sampled_from([1, 2]), ratio=st.sampled_from([0.25, 0.5]),
       channels_too=st.booleans(), batch=st.integers(1, 3), seq=st.integers(3, 10))
def test_hugging_face_decoder_rms_norm_of_elementary_ops_narrows_the_stream(tie, family, layers, heads, kv_groups, ratio,
                                                                             channels_too, batch, seq):
    """Llama's / Qwen2's RMSNorm is pow, mean, rsqrt and multiplies; capture fuses it into one rms_norm, so the
    stream of a causal LM narrows (embeddings and a tied or untied lm_head lose the same columns). Equal to the
    model itself whose RMSNorms normalise over the kept channels, at another batch size and length."""
    import transformers
    import hf_models

    arch = hf_models.Arch(heads=heads, layers=layers, kv_groups=kv_groups)
    config = getattr(transformers, hf_models.FAMILIES[family].config)(
        **hf_models.FAMILIES[family].kwargs(arch), tie_word_embeddings=tie, attn_implementation="eager")
    model = hf_models.randomize(getattr(transformers, f"{family}ForCausalLM")(config)).eval()
    snapshot = state_snapshot(model)
    analysis = fxprune.analyze(model, hf_models.inputs(family, 2, 8, torch.Generator().manual_seed(0)))
    kinds = ("residual", "qk", "v", "mlp") if channels_too else ("residual",)
    plan = fxprune.plan(analysis, ratio, kinds=kinds)
    pruned = fxprune.apply(analysis, plan)
    hidden = config.hidden_size
    norms = {name: m for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")
             and tuple(m.weight.shape) == (hidden,)}
    assert len(norms) == 2 * layers + 1
    first = next(iter(norms))
    kept = _kept_mask(norms[first].weight.detach(), pruned.get_parameter(f"{first}.weight").detach())
    assert int(kept.sum()) == hidden - int(ratio * hidden)
    embed, head = pruned.get_parameter("model.embed_tokens.weight"), pruned.get_parameter("lm_head.weight")
    assert embed.shape == head.shape == (config.vocab_size, int(kept.sum()))
    assert (embed is head) == tie  # tied weights stay one tensor
    reference = _weights_zeroed(model, analysis, plan) if channels_too else copy.deepcopy(model)
    for name, module in reference.named_modules():
        if name in norms:
            module.forward = _rms_norm_over(module, kept)
    x = hf_models.inputs(family, batch, seq, torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = main_output(pruned(*x)), main_output(reference(*x))
        whole_width = main_output(fxprune.mask(model, fxprune.plan(analysis, 0.0))(*x))  # nothing removed
    assert fxprune.relative_error(got, want) < 1e-5
    assert fxprune.relative_error(got, whole_width) > 1e-3  # the comparison can tell a narrowed stream apart
    assert_unchanged(model, snapshot)


class _WrittenOutRMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.3 * torch.randn(width))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class _PreNormMLPs(nn.Module):
    """Tokens -> Linear embedding -> pre-norm MLP blocks (hand-written RMSNorm) -> norm -> head."""

    def __init__(self, width: int = 12, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(5, width)
        self.norms = nn.ModuleList(_WrittenOutRMSNorm(width) for _ in range(blocks))
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.norm, self.head = _WrittenOutRMSNorm(width), nn.Linear(width, 3)

    def forward(self, x):
        x = self.embed(x)
        for norm, fc in zip(self.norms, self.fcs):
            x = x + fc(norm(x))
        return self.head(self.norm(x))


def test_symbolic_trace_fuses_a_written_out_rms_norm():
    """The same fusion on a symbolic trace (call_method pow / mean, torch.rsqrt, operator ops): the stream
    narrows, equal to the model whose norms normalise over the kept channels."""
    torch.manual_seed(0)
    model = _PreNormMLPs().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 7, 5),))
    assert [g.kind for g in analysis.groups if g.prunable].count("residual") == 1
    pruned = fxprune.prune(model, 0.5, kinds=("residual",), example_inputs=(torch.randn(2, 7, 5),))
    kept = _kept_mask(model.norm.weight.detach(), pruned.get_parameter("norm.weight").detach())
    assert int(kept.sum()) == 6

    def over_kept(module):
        def forward(x):
            h = x[..., kept]
            y = torch.zeros_like(x)
            y[..., kept] = module.weight[kept] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
            return y
        return forward

    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, _WrittenOutRMSNorm):
            module.forward = over_kept(module)
    x = torch.randn(3, 4, 5)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(x), reference(x)) < 1e-5
