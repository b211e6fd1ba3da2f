"""timm "notrace" leaves: traced into when fxprune has no rule for them and they trace; kept opaque (and
named, with why) when they cannot be traced; torch.export when the symbolic graph fails on the inputs."""
import pytest
import timm
import torch
import torch.nn as nn

import fxprune
from fxprune import meta
from fxprune.capture import capture, tracer
from helpers import randomize

BATCHES = (2, 3)


def _masked_errors(model, analysis, plan, pruned, example):
    # export graphs lift tensor constants the model does not hold by that name: mask the captured graph
    exported = analysis.gm.meta.get(meta.CAPTURE_METHOD) == "torch.export"
    reference = fxprune.mask(analysis if exported else model, plan, example_inputs=analysis.captured.example_inputs)
    errors = []
    with torch.no_grad():
        for batch in BATCHES:
            x = torch.randn(batch, *example.shape[1:])
            out = pruned(x)
            assert out.shape[0] == batch
            errors.append(fxprune.relative_error(out, reference(x)))
    return errors


def _attention_shrinks(analysis, plan):
    return {analysis.group(g).kind for g, rows in plan.removed.items() if any(rows)} & {"qk", "v", "heads"}


def test_tiny_vit_attention_prunes_through_export():
    model = randomize(timm.create_model("tiny_vit_5m_224", embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1),
                                        num_heads=(1, 2, 2, 4), window_sizes=(2, 2, 2, 2), num_classes=5)).eval()
    x = torch.randn(1, 3, 64, 64)
    # TinyVitBlock branches on its input's size: symbolic tracing keeps it opaque (saying why) ...
    kept = capture(model, (x,), method="symbolic").gm.meta[meta.KEPT_LEAVES]
    assert kept and all(type(model.get_submodule(p)).__name__ == "TinyVitBlock" for p in kept)
    assert all("cannot trace" in why for why in kept.values())
    # ... so capture takes torch.export's graph, which sees attention and MLP inside the blocks
    analysis = fxprune.analyze(model, example_inputs=(x,))
    assert analysis.gm.meta.get(meta.CAPTURE_METHOD) == "torch.export"
    plan = fxprune.plan(analysis, 0.25, head_ratio=0.5)
    pruned = fxprune.apply(analysis, plan)
    assert _attention_shrinks(analysis, plan) >= {"qk", "v", "heads"}
    assert max(_masked_errors(model, analysis, plan, pruned, x)) < 1e-5


def test_batchnorm_act_is_traced_into():
    # BatchNormAct2d (timm leaf, no module rule) traces: its channels follow the conv before it
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8), nn.Conv2d(8, 4, 1)).eval()
    randomize(model)
    analysis = fxprune.analyze(model, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert "1" in analysis.gm.meta[meta.OPENED_LEAVES]
    assert not analysis.unknown_ops
    assert any(g.prunable and any("0.weight" in m for m in map(str, g.members)) for g in analysis.groups)


def test_mobilevit_prunes_attention_through_export():
    # MobileVitBlock branches on its input's size (symbolic tracing cannot): capture uses torch.export
    model = randomize(timm.create_model("mobilevit_xxs", num_classes=5)).eval()
    x = torch.randn(1, 3, 64, 64)
    analysis = fxprune.analyze(model, example_inputs=(x,))
    assert analysis.gm.meta.get(meta.CAPTURE_METHOD) == "torch.export"
    plan = fxprune.plan(analysis, 0.25, head_ratio=0.5)
    pruned = fxprune.apply(analysis, plan)
    assert _attention_shrinks(analysis, plan) >= {"qk", "v"}
    assert max(_masked_errors(model, analysis, plan, pruned, x)) < 1e-5


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Net(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.inner = inner
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.inner(self.a(x)))


@pytest.fixture
def toy_leaves(monkeypatch):
    leaves, functions = tracer._timm_leaves()
    monkeypatch.setattr(tracer, "_timm_leaves", lambda: (leaves + (Branchy, Plain), functions))


def test_untraceable_leaf_stays_opaque_and_is_named(toy_leaves):
    model = randomize(Net(Branchy())).eval()
    captured = capture(model, (torch.randn(1, 4),), method="symbolic")
    assert "untraceable" not in captured.gm.meta[meta.KEPT_LEAVES]
    assert "cannot trace" in captured.gm.meta[meta.KEPT_LEAVES]["inner"]
    assert any(node.op == "call_module" and node.target == "inner" for node in captured.gm.graph.nodes)
    analysis = fxprune.analyze(model, example_inputs=(torch.randn(1, 4),))
    named = [op.target for op in analysis.unknown_ops]
    assert any("'inner' (Branchy)" in t and "kept opaque because torch.fx cannot trace it" in t for t in named)


def test_traceable_leaf_is_opened(toy_leaves):
    model = randomize(Net(Plain())).eval()
    x = torch.randn(1, 4)
    analysis = fxprune.analyze(model, example_inputs=(x,))
    assert analysis.gm.meta[meta.OPENED_LEAVES] == ["inner"]
    assert not analysis.unknown_ops
    assert any(g.prunable and any("inner.fc" in str(m) for m in g.members) for g in analysis.groups)


class DivergesWhenTraced(nn.Module):
    """Traces symbolically, but the traced graph fails on real inputs (like hiera's None.view)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if isinstance(h, torch.fx.Proxy):
            h = h.view(5, 7, -1)  # wrong for any real input
        return self.fc2(h)


def test_export_fallback_after_shape_propagation_fails(capfd):
    model = randomize(DivergesWhenTraced()).eval()
    x = torch.randn(1, 6)
    with pytest.raises(fxprune.CaptureError, match=r"running the traced .* at node 'view'"):
        capture(model, (x,), method="symbolic")
    analysis = fxprune.analyze(model, example_inputs=(x,))
    assert analysis.gm.meta.get(meta.CAPTURE_METHOD) == "torch.export"
    assert "Traceback" not in capfd.readouterr().err  # a failure capture recovers from prints nothing
    plan = fxprune.plan(analysis, 0.25)
    pruned = fxprune.apply(analysis, plan)
    assert any(any(rows) for rows in plan.removed.values())
    assert max(_masked_errors(model, analysis, plan, pruned, x)) < 1e-5
