"""What keeps pruning a large exported decoder affordable, without giving up the guarantees: capture shares
the model's parameters instead of copying them (and nothing writes into them), and the self-check's
reference masks the activations of torch.export's ``aten.linear`` calls instead of copying their weights,
while still catching a wrong rewrite."""
from __future__ import annotations

import pytest
import torch

import fxprune
import fxprune.rewrite as rewrite
from fxprune.capture import capture
from fxprune.masked_reference import weight_masked
from fxprune.verify import masked

transformers = pytest.importorskip("transformers")

from helpers import assert_unchanged, state_snapshot  # noqa: E402
from hf_models import Arch, build, inputs  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama(layers: int = 2):
    return build("Llama", Arch(heads=4, head_dim=8, layers=layers, intermediate=24, kv_groups=2), "sdpa")


def _ids(batch: int = 1, seq: int = 6, seed: int = 0) -> tuple:
    return inputs("Llama", batch, seq, torch.Generator().manual_seed(seed))


def _storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers()) if t.numel()}


def test_capture_shares_the_parameters_and_prune_leaves_them_untouched():
    model = _llama()
    snapshot, parameters = state_snapshot(model), dict(model.named_parameters())
    flags, config = {n: p.requires_grad for n, p in parameters.items()}, model.config.to_dict()
    captured = capture(model, _ids())
    assert {p.untyped_storage().data_ptr() for p in captured.gm.parameters()} == \
        {p.untyped_storage().data_ptr() for p in model.parameters()}  # shared, not copied

    pruned = fxprune.prune(model, 0.5, example_inputs=_ids())
    assert fxprune.check_of(pruned).error < 1e-5
    assert_unchanged(model, snapshot)
    assert dict(model.named_parameters()) == parameters  # the same Parameter objects, none replaced
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.config.to_dict() == config and model.config.use_cache  # capture turned off its copy's cache
    # the pruned model owns its tensors: training it cannot reach the user's model
    assert not _storages(pruned) & _storages(model)
    pruned.train()
    pruned(*_ids(2, 5)).last_hidden_state.square().mean().backward()
    for p in pruned.parameters():
        if p.grad is not None:
            p.data.add_(p.grad)
    assert_unchanged(model, snapshot)


def test_the_reference_of_an_exported_decoder_masks_its_linear_calls():
    """torch.export's graph calls aten.linear on get_attr weights: the reference masks those calls'
    activations (no projection weight is copied) and computes what the weight-zeroed copy computes."""
    model = _llama()
    analysis = fxprune.analyze(model, _ids())
    plan = fxprune.plan(analysis, 0.5)
    reference = weight_masked(analysis, plan.removed_atoms(analysis))
    projections = {name for name, _ in model.named_parameters() if name.rsplit(".", 2)[-2] in PROJECTIONS}
    assert set(reference.linear_calls) == projections
    assert all("norm" in name for name in reference.tensors)  # only the (small) norm weights are copied
    x = _ids(1, 6)
    with torch.no_grad():
        got = reference.run(analysis.gm, x).last_hidden_state
        want = masked(model, analysis, plan)(*x).last_hidden_state
        assert fxprune.relative_error(got, want) < 1e-6 < fxprune.relative_error(got, model(*x).last_hidden_state)


def _misalign_gate(slice_parameters):
    """A rewrite bug: the first gate projection keeps its channels in reverse order, up and down do not."""
    def wrong(gm, keep):
        keep = {name: dict(dims) for name, dims in keep.items()}
        name = next(n for n in keep if n.endswith("gate_proj.weight"))
        keep[name][0] = keep[name][0].flip(0)
        return slice_parameters(gm, keep)
    return wrong


def test_a_wrong_slice_in_an_exported_decoder_is_caught(monkeypatch):
    monkeypatch.setattr(rewrite, "slice_parameters", _misalign_gate(rewrite.slice_parameters))
    model = _llama(layers=1)
    with pytest.raises(fxprune.RewriteError, match="differs from the masked original"):
        fxprune.prune(model, 0.5, example_inputs=_ids())


def test_capture_records_an_exported_graphs_values_without_running_it(monkeypatch):
    """An exported graph's shapes are recorded on fake tensors (no forward pass): the same values a real run
    records."""
    import fxprune.capture
    from fxprune import meta
    from fxprune.capture import record_values

    def real_run(*args):
        raise AssertionError("capture ran the exported graph on real tensors")

    model, x = _llama(), _ids()
    with monkeypatch.context() as patch:
        patch.setattr(fxprune.capture, "record_values", real_run)
        captured = capture(model, x)
    assert captured.gm.meta[meta.CAPTURE_METHOD] == "torch.export"
    recorded = {n.name: n.meta.get(meta.VALUE) for n in captured.gm.graph.nodes}
    record_values(captured.gm, x, "Llama")
    assert {n.name: n.meta.get(meta.VALUE) for n in captured.gm.graph.nodes} == recorded
    assert sum(1 for v in recorded.values() if v is not None) > 100


def test_example_inputs_the_model_cannot_run_are_a_capture_error():
    """Fake tensors do not read values: token ids beyond the vocabulary get through capture, and the self-check
    (the first real run) says the inputs are at fault, not the rewrite."""
    bad = (torch.full((1, 6), 10_000),)
    with pytest.raises(fxprune.CaptureError, match="example inputs failed.*IndexError"):
        fxprune.prune(_llama(layers=1), 0.5, example_inputs=bad)


def test_the_garbage_collector_is_paused_within_a_step_only():
    import gc

    from fxprune.capture import paused_gc

    with pytest.raises(ValueError):
        with paused_gc():
            assert not gc.isenabled()
            raise ValueError
    assert gc.isenabled()
    with pytest.raises(fxprune.CaptureError):  # a capture that fails leaves it on too
        fxprune.analyze(_llama(layers=1), (torch.randn(1, 3, 8, 8),))
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # a caller's choice stands
    finally:
        gc.enable()
