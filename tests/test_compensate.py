"""Least-squares compensation (rewrite/compensate.py): the solve, the logit fit, plain folded weights, sequential mode."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxprune
from fxprune import meta
from fxprune.analysis.shapes import kept_indices
from fxprune.errors import InvalidArgumentError
from fxprune.rewrite.compensate import ridge_solve
from fxprune.statistics import RIDGE, RIDGE_PER_FEATURE, relative_ridge, watch
from helpers import assert_unchanged, examples, small_vit, state_snapshot

X = torch.randn(1, 3, 16, 16)
DATA = [torch.randn(8, 3, 16, 16) for _ in range(3)]


def _explicit_ridge(x, y, prior, strength):
    """The same problem as an ordinary least-squares one: rows of sqrt(λ)·I pull towards the prior."""
    n = x.shape[1]
    design = torch.cat([x, strength ** 0.5 * torch.eye(n, dtype=x.dtype)])
    target = torch.cat([y, strength ** 0.5 * prior])
    return torch.linalg.lstsq(design, target).solution


def test_ridge_solve_matches_an_explicit_solve():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 7, generator=generator, dtype=torch.float64)
    x[:, 3] = x[:, 2] + 1e-3 * x[:, 3]  # nearly collinear inputs: where the ridge matters
    y = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    prior = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    solved = ridge_solve(x.T @ x, x.T @ y, prior, ridge=0.05)
    strength = 0.05 * float((x.T @ x).diagonal().mean())
    assert torch.allclose(solved, _explicit_ridge(x, y, prior, strength), atol=1e-9)


class Mlp(nn.Module):
    """One residual MLP block: one layer (fc2) whose inputs shrink."""

    def __init__(self, dim: int = 8, hidden: int = 24) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


TOKENS = [torch.randn(4, 6, 8) for _ in range(3)]


def test_layer_weights_are_the_ridge_fit_of_the_unpruned_layer_folded_into_a_plain_graph():
    model = Mlp().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 5, 8),))
    plan = fxprune.plan(analysis, 0.5)
    plain = fxprune.apply(analysis, plan)
    pruned = fxprune.apply(analysis, plan, reweight_data=TOKENS, compensation="least_squares")
    kept = kept_indices(analysis, plan.removed_atoms(analysis))["fc2.weight"][1]
    with torch.no_grad():
        hidden = torch.cat([F.gelu(model.fc1(x)).reshape(-1, 24) for x in TOKENS]).double()
        target = hidden @ model.fc2.weight.double().T + model.fc2.bias.double()
    design = torch.cat([hidden[:, kept], torch.ones(len(hidden), 1, dtype=torch.float64)], 1)
    prior = torch.cat([model.fc2.weight.double()[:, kept].T, model.fc2.bias.double()[None]])
    # few rows for the features: the ridge is raised with features / rows above its floor
    ridge = relative_ridge(design.shape[1], len(design))
    assert ridge == RIDGE_PER_FEATURE * 13 / 72 > RIDGE
    strength = ridge * float((design.T @ design).diagonal().mean())
    expected = _explicit_ridge(design, target, prior, strength)
    assert torch.allclose(pruned.fc2.weight.double(), expected[:-1].T, atol=1e-5)
    assert torch.allclose(pruned.fc2.bias.double(), expected[-1], atol=1e-5)
    assert not torch.allclose(pruned.fc2.weight, plain.fc2.weight, atol=1e-3)  # it did change the layer
    # the reported calibration errors are the explicit ones, before (prior) and after (the fit)
    fitted = next(f for f in pruned.meta[meta.COMPENSATED] if f.name == "fc2")
    assert fitted.error_before == pytest.approx(float((design @ prior - target).square().sum()), rel=1e-6)
    assert fitted.error_after == pytest.approx(float((design @ expected - target).square().sum()), rel=1e-6)
    # folded: the same plain graph as without compensation, no extra nodes or parameters
    assert [n.target for n in pruned.graph.nodes] == [n.target for n in plain.graph.nodes]
    assert fxprune.count_params(pruned) == fxprune.count_params(plain)


def test_sequential_equals_one_shot_when_one_layer_is_compensated():
    model = Mlp().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 5, 8),))
    plan = fxprune.plan(analysis, 0.5)
    one_shot = fxprune.apply(analysis, plan, reweight_data=TOKENS, compensation="least_squares")
    sequential = fxprune.apply(analysis, plan, reweight_data=TOKENS, compensation="sequential")
    for name, p in one_shot.named_parameters():
        assert torch.allclose(p, sequential.get_parameter(name), atol=1e-6), name


def _layer_error(weight, bias, x, y):
    return float((x @ weight.T + bias - y).square().sum())


def _fc2_records(model, data):
    """The last block's fc2 inputs and outputs on the unpruned model."""
    rows = []
    hook = model.blocks[-1].mlp.fc2.register_forward_hook(lambda m, i, o: rows.append((i[0].flatten(0, 1), o.flatten(0, 1))))
    with torch.no_grad():
        for x in data:
            model(x)
    hook.remove()
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


@settings(max_examples=examples(6), deadline=None)
@given(heads=st.integers(1, 3), per_head=st.integers(4, 8), depth=st.integers(1, 2), ratio=st.sampled_from([0.25, 0.5, 0.75]),
       fused=st.booleans(), sequential=st.booleans())
def test_compensation_never_increases_a_layers_calibration_error(heads, per_head, depth, ratio, fused, sequential):
    model = small_vit(embed_per_head=per_head, num_heads=heads, depth=depth, fused_attn=fused)
    snapshot = state_snapshot(model)
    analysis = fxprune.analyze(model, (X,))
    plan = fxprune.plan(analysis, ratio)
    plain = fxprune.apply(analysis, plan)
    pruned = fxprune.apply(analysis, plan, reweight_data=DATA, compensation="sequential" if sequential else "least_squares")
    fitted = pruned.meta[meta.COMPENSATED]
    assert fitted and all(f.error_after <= f.error_before * (1 + 1e-6) + 1e-9 for f in fitted)
    assert sum(":" in f.name for f in fitted) > 0  # q/k products were compensated too (k rows of qkv)
    if not sequential:  # the last fc2, recomputed independently from the unpruned model's activations
        x, y = _fc2_records(model, DATA)
        kept = kept_indices(analysis, plan.removed_atoms(analysis))["blocks.%d.mlp.fc2.weight" % (depth - 1)][1]
        name = f"blocks.{depth - 1}.mlp.fc2"
        before = _layer_error(plain.get_parameter(f"{name}.weight"), plain.get_parameter(f"{name}.bias"), x[:, kept], y)
        after = _layer_error(pruned.get_parameter(f"{name}.weight"), pruned.get_parameter(f"{name}.bias"), x[:, kept], y)
        assert after <= before * (1 + 1e-5)
    with torch.no_grad():  # still a working model at another batch size
        assert pruned(torch.randn(3, 3, 16, 16)).shape == (3, 5)
    assert_unchanged(model, snapshot)


class Attention(nn.Module):
    """Separate q and k Linears (with bias), two heads, SDPA."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, t):
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x):
        out = F.scaled_dot_product_attention(self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x)))
        return self.proj(out.transpose(1, 2).flatten(2))


def _logits(model, q_weight, q_bias, k_weight, k_bias, data, heads=2):
    out = []
    for x in data:
        q = F.linear(x, q_weight, q_bias).view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
        k = F.linear(x, k_weight, k_bias).view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
        out.append(q @ k.transpose(-2, -1))
    return torch.cat(out)


def test_key_rows_absorb_removed_query_channels_that_kept_ones_explain():
    """Where each removed q channel is a combination of its head's kept ones, compensated logits are exact."""
    torch.manual_seed(0)
    model = Attention().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 5, 16),))
    plan = fxprune.plan(analysis, 0.5, kinds=("qk",))
    keep = kept_indices(analysis, plan.removed_atoms(analysis))
    kept = keep["q.weight"][0]
    gone = torch.tensor(sorted(set(range(16)) - set(kept.tolist())))
    with torch.no_grad():  # make every removed q row a mix of its own head's kept rows (bias too)
        for g in gone.tolist():
            head_kept = kept[kept // 8 == g // 8]
            mix = torch.randn(len(head_kept))
            model.q.weight[g] = mix @ model.q.weight[head_kept]
            model.q.bias[g] = mix @ model.q.bias[head_kept]
    data = [torch.randn(4, 7, 16) for _ in range(3)]
    plain = fxprune.apply(model, plan, example_inputs=(torch.randn(2, 5, 16),))
    pruned = fxprune.apply(model, plan, example_inputs=(torch.randn(2, 5, 16),), reweight_data=data,
                           compensation="least_squares")
    with torch.no_grad():
        full = _logits(model, model.q.weight, model.q.bias, model.k.weight, model.k.bias, data)
        uncompensated = _logits(model, plain.q.weight, plain.q.bias, plain.k.weight, plain.k.bias, data)
        compensated = _logits(model, pruned.q.weight, pruned.q.bias, pruned.k.weight, pruned.k.bias, data)
    assert torch.equal(pruned.q.weight, plain.q.weight)  # q is what the product is regressed on: it stays
    assert not torch.allclose(pruned.k.weight, plain.k.weight)
    before, after = (float((logits - full).square().mean()) for logits in (uncompensated, compensated))
    assert before > 1e-2 and after < 1e-3 * before


class KeyBeforeMlp(Attention):
    """k is computed from the block input before an MLP whose fc2 shrinks; q and v read the MLP's output."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)

    def forward(self, x):
        k = self.split(self.k(x))
        h = x + self.fc2(F.gelu(self.fc1(x)))
        out = F.scaled_dot_product_attention(self.split(self.q(h)), k, self.split(self.v(h)))
        return self.proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("model_class", [Attention, KeyBeforeMlp])
def test_sequential_folds_the_same_key_rows_as_one_shot(model_class):
    """The key fold regresses on the unpruned model's queries in both modes, so k comes out the same. Sequential
    records the queries on the way through its layer-by-layer runs; where k's Linear runs before an earlier
    shrinking layer (KeyBeforeMlp), by a pass of its own, before any pruned run reaches k."""
    torch.manual_seed(0)
    model = model_class().eval()
    example = (torch.randn(2, 5, 16),)
    analysis = fxprune.analyze(model, example)
    plan = fxprune.plan(analysis, 0.5)
    data = [torch.randn(4, 7, 16) for _ in range(3)]
    plain = fxprune.apply(analysis, plan)
    one_shot = fxprune.apply(analysis, plan, reweight_data=data, compensation="least_squares")
    sequential = fxprune.apply(analysis, plan, reweight_data=data, compensation="sequential")
    assert not torch.allclose(one_shot.k.weight, plain.k.weight, atol=1e-4)
    assert torch.allclose(sequential.k.weight, one_shot.k.weight, atol=1e-6)
    assert torch.allclose(sequential.k.bias, one_shot.k.bias, atol=1e-6)
    # proj, the last layer, was fitted on inputs of the model with k already folded: the fit recomputed on the result
    keep = kept_indices(analysis, plan.removed_atoms(analysis))
    inputs, targets = [], []
    watch(sequential, [(x,) for x in data], {"proj": lambda args, out: inputs.append(args[0])})
    watch(analysis.gm, [(x,) for x in data], {"proj": lambda args, out: targets.append(out)})
    design = torch.cat([torch.cat(inputs).reshape(-1, 8).double(), torch.ones(3 * 4 * 7, 1, dtype=torch.float64)], 1)
    prior = torch.cat([model.proj.weight.double()[:, keep["proj.weight"][1]].T, model.proj.bias.double()[None]])
    strength = relative_ridge(design.shape[1], len(design)) * float((design.T @ design).diagonal().mean())
    expected = _explicit_ridge(design, torch.cat(targets).reshape(-1, 16).double(), prior, strength)
    assert torch.allclose(sequential.proj.weight.double(), expected[:-1].T, atol=1e-5)


def test_compensation_options_are_checked():
    model = small_vit(depth=1)
    with pytest.raises(InvalidArgumentError, match="compensation"):
        fxprune.prune(model, 0.5, example_inputs=(X,), reweight_data=DATA, compensation="ols")
    with pytest.raises(InvalidArgumentError, match="reweight_data"):
        fxprune.prune(model, 0.5, example_inputs=(X,), compensation="least_squares")


@pytest.mark.parametrize("family, products", [("GPT-2", 1), ("Llama", 0), ("BERT", 1)])
def test_hugging_face_layers_are_compensated(family, products):
    """GPT-2's Conv1D (addmm, weight [in, out]); Llama's rotary q/k are left alone (k is not a Linear's rows)."""
    pytest.importorskip("transformers")
    import hf_models

    generator = torch.Generator().manual_seed(0)
    model = hf_models.build(family, attention="sdpa")
    snapshot = state_snapshot(model)
    analysis = fxprune.analyze(model, hf_models.inputs(family, 2, 8, generator))
    plan = fxprune.plan(analysis, 0.5)
    data = [hf_models.inputs(family, 4, 8, generator) for _ in range(2)]
    pruned = fxprune.apply(analysis, plan, reweight_data=data, compensation="least_squares")
    fitted = pruned.meta[meta.COMPENSATED]
    layers = [f for f in fitted if ":" not in f.name]
    heads = [f for f in fitted if ":" in f.name]
    assert len(layers) == 2 * hf_models.Arch().layers  # the attention output and the MLP's last projection
    assert bool(heads) == bool(products)
    assert all(f.error_after <= f.error_before * (1 + 1e-6) + 1e-9 for f in fitted)
    assert sum(f.error_after for f in layers) < 0.9 * sum(f.error_before for f in layers)
    with torch.no_grad():
        pruned(*hf_models.inputs(family, 3, 5, generator))
    assert_unchanged(model, snapshot)


# --- the reconstruction criterion (importance/reconstruction.py) ---------------------------------------------

def test_reconstruction_score_is_the_layers_error_increase_when_one_input_goes():
    from fxprune.importance.reconstruction import reconstruction

    model = Mlp().eval()
    analysis = fxprune.analyze(model, (torch.randn(2, 5, 8),))
    scores = reconstruction(analysis, data=TOKENS, ridge=1e-12)
    group = next(g for g in analysis.groups if g.kind == "mlp")
    with torch.no_grad():
        hidden = torch.cat([F.gelu(model.fc1(x)).reshape(-1, 24) for x in TOKENS]).double()
        design = torch.cat([hidden, torch.ones(len(hidden), 1, dtype=torch.float64)], 1)
        target = hidden @ model.fc2.weight.double().T + model.fc2.bias.double()
    start = next(s.start for s in analysis.ids.spaces if s.param == "fc2.weight" and s.dim == 1)
    for atom in group.atoms:
        column = next(c for c in range(24) if int(analysis.atoms.atom_of[start + c]) == atom)
        others = design[:, [c for c in range(25) if c != column]]
        residual = target - others @ torch.linalg.lstsq(others, target).solution
        assert float(scores[atom]) == pytest.approx(float(residual.square().sum()), rel=1e-4)


def test_reconstruction_removes_the_query_channel_its_head_can_rebuild():
    """Each head has one q channel that is twice another (large, so magnitude keeps it): reconstruction removes
    one of the pair, and compensation then restores the logits exactly."""
    torch.manual_seed(0)
    model = Attention().eval()
    with torch.no_grad():
        for head in range(2):
            model.q.weight[8 * head + 5] = 2 * model.q.weight[8 * head + 1]
            model.q.bias[8 * head + 5] = 2 * model.q.bias[8 * head + 1]
    data = [torch.randn(4, 7, 16) for _ in range(3)]
    analysis = fxprune.analyze(model, (torch.randn(2, 5, 16),))
    for importance, expected in (("reconstruction", True), ("l2", False)):
        plan = fxprune.plan(analysis, 1 / 8, kinds=("qk",), importance=importance, data=data)
        kept = set(kept_indices(analysis, plan.removed_atoms(analysis))["q.weight"][0].tolist())
        removed = set(range(16)) - kept
        assert (removed <= {1, 5, 9, 13}) == expected, (importance, removed)
    pruned = fxprune.apply(analysis, plan_for(analysis, data), reweight_data=data, compensation="least_squares")
    with torch.no_grad():
        full = _logits(model, model.q.weight, model.q.bias, model.k.weight, model.k.bias, data)
        compensated = _logits(model, pruned.q.weight, pruned.q.bias, pruned.k.weight, pruned.k.bias, data)
    # not zero: the ridge (7 features fitted on 84 query rows per head: 2.5e-2) shrinks the rebuilt share
    assert float((compensated - full).square().mean()) < 1e-5 * float(full.square().mean())


def plan_for(analysis, data):
    return fxprune.plan(analysis, 1 / 8, kinds=("qk",), importance="reconstruction", data=data)


def test_reconstruction_serves_budgets_and_falls_back_to_magnitude_where_no_linear_reads_a_group():
    from toy_models import ConvMlp

    model = small_vit(depth=2)
    analysis = fxprune.analyze(model, (X,))
    plan = fxprune.plan(analysis, target_macs=0.7, importance="reconstruction", data=DATA)
    pruned = fxprune.apply(analysis, plan)
    assert fxprune.count_macs(pruned, (X,)) <= 0.71 * fxprune.count_macs(model, (X,))
    conv = ConvMlp().eval()
    analysis = fxprune.analyze(conv, (torch.randn(1, 8, 4, 4),))
    scores = fxprune.importance.score(analysis, "reconstruction", data=[torch.randn(2, 8, 4, 4)])
    hidden = torch.tensor(next(g for g in analysis.groups if g.kind == "mlp").atoms)
    assert torch.equal(scores[hidden], fxprune.importance.score(analysis, "l2")[hidden])


def test_auto_prune_starts_from_reconstruction_and_compensates_by_least_squares():
    model = small_vit(depth=2)
    pruned = fxprune.auto_prune(model, DATA, 0.7, example_inputs=(X,), steps=6, progress=False,
                                init_importance="reconstruction", compensation="least_squares")
    options = fxprune.plan_of(pruned).options
    assert options["init_importance"] == "reconstruction" and options["compensation"] == "least_squares"
    assert pruned.meta[meta.COMPENSATED]
    assert fxprune.count_macs(pruned, (X,)) <= 0.71 * fxprune.count_macs(model, (X,))
    with pytest.raises(InvalidArgumentError, match="unknown importance"):
        fxprune.auto_prune(model, DATA, 0.7, example_inputs=(X,), steps=1, progress=False, init_importance="obs?")


def test_sequential_fits_each_layer_on_the_model_compensated_before_it_in_an_exported_graph():
    """An exported graph fetches every weight up front: the later layer's statistics must still come from the
    model whose earlier layers are already compensated (its weights equal the fit recomputed on the result)."""
    pytest.importorskip("transformers")
    import hf_models
    from fxprune.rewrite.compensate import shrinking_layers

    generator = torch.Generator().manual_seed(0)
    model = hf_models.build("BERT", attention="sdpa")
    analysis = fxprune.analyze(model, hf_models.inputs("BERT", 2, 8, generator))
    assert analysis.gm.meta.get(meta.CAPTURE_METHOD) == "torch.export"
    plan = fxprune.plan(analysis, 0.5)
    data = [hf_models.inputs("BERT", 4, 8, generator) for _ in range(3)]
    pruned = fxprune.apply(analysis, plan, reweight_data=data, compensation="sequential")
    keep = kept_indices(analysis, plan.removed_atoms(analysis))
    last = shrinking_layers(analysis, keep)[-1]
    inputs, targets = [], []
    watch(pruned, data, {last.node: lambda args, out: inputs.append(args[last.input_position])})
    watch(analysis.gm, data, {last.node: lambda args, out: targets.append(out)})
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]).double()
    y = torch.cat([t.reshape(-1, t.shape[-1]) for t in targets]).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    weight, bias = analysis.tensor(last.weight).double(), analysis.tensor(last.bias).double()
    prior = torch.cat([weight[:, last.kept].T, bias[None]])
    strength = relative_ridge(design.shape[1], len(design)) * float((design.T @ design).diagonal().mean())
    expected = _explicit_ridge(design, y, prior, strength)
    assert torch.allclose(pruned.get_parameter(last.weight).double(), expected[:-1].T, atol=1e-4, rtol=1e-3)


def test_sequential_compensation_takes_back_what_a_removed_block_added_to_the_stream():
    """After a removed block nothing's inputs shrank, yet the stream lacks what the block added: every later
    stream writer (attention projection, fc2) is fitted to its unpruned output plus the stream's deviation at
    its add. On held-out inputs the compensated model is closer to the unpruned one; each fit lowers its own
    calibration error; one-shot least squares (no pruned stream to compare with) leaves them alone."""
    model = small_vit(num_heads=2, depth=4)
    generator = torch.Generator().manual_seed(0)
    calibration = [(torch.randn(8, 3, 16, 16, generator=generator),) for _ in range(4)]
    held_out = torch.randn(16, 3, 16, 16, generator=generator)
    analysis = fxprune.analyze(model, (held_out[:2],))
    plan = fxprune.plan(analysis, 0.0)
    plan.branches, plan.options["layers"] = ["blocks.1:attention", "blocks.1:mlp"], ["blocks.1"]
    plain = fxprune.apply(analysis, plan)
    fitted = fxprune.apply(analysis, plan, reweight_data=calibration, compensation="sequential")
    one_shot = fxprune.apply(analysis, plan, reweight_data=calibration, compensation="least_squares")
    writers = {f.name: f for f in fitted.meta["fxprune_compensated"]}
    assert len(writers) == 4  # blocks 2 and 3: attention projection and fc2
    assert all(f.error_after <= f.error_before for f in writers.values())
    assert one_shot.meta["fxprune_compensated"] == []
    with torch.no_grad():
        want = model(held_out)
        before = float(torch.linalg.vector_norm(plain(held_out) - want))
        after = float(torch.linalg.vector_norm(fitted(held_out) - want))
    # 0.34 here; fitting the writers to their unpruned outputs alone (no deviation term) leaves 0.68
    assert after < 0.5 * before
