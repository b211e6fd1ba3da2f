"""Op rules on hand-written blocks: couplings found from the graph, masked equivalence after pruning."""
import pytest
import torch
from hypothesis import given, strategies as st

import fxprune
from helpers import assert_unchanged, masked_error, state_snapshot
from toy_models import (CatBiasAttention, ChunkedAttention, ConvMlp, InterleavedRotary, LinearAttention,
                        OldStyleAttention, Residual, SeparateProjections, SharedDepthwiseOnV, UnknownOpMlp)

TOKENS = 9


def _prune_and_check(model, x, ratio, importance="l2", head_ratio=0.0):
    snapshot = state_snapshot(model)
    analysis = fxprune.analyze(model, (x[:1],))
    plan = fxprune.plan(analysis, ratio, importance=importance, head_ratio=head_ratio)
    pruned = fxprune.apply(analysis, plan)
    assert masked_error(model, analysis, plan, pruned, x) < 1e-5
    assert_unchanged(model, snapshot)
    return analysis, plan, pruned


def _groups(analysis, kind):
    return [g for g in analysis.groups if g.kind == kind]


ATTENTIONS = [OldStyleAttention, SeparateProjections, SharedDepthwiseOnV, LinearAttention, CatBiasAttention,
              ChunkedAttention]


@pytest.mark.parametrize("block", ATTENTIONS, ids=lambda c: c.__name__)
@given(ratio=st.floats(0.25, 0.9), batch=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]))
def test_attention_blocks_prune_equal_to_masked(block, ratio, batch, heads):
    model = Residual(block(dim=16, heads=heads), 16).eval()
    x = torch.randn(batch, TOKENS, 16)
    analysis, plan, pruned = _prune_and_check(model, x, ratio)
    assert _groups(analysis, "qk") and _groups(analysis, "v")
    assert fxprune.count_params(pruned) < fxprune.count_params(model)


def test_temperature_from_shape_keeps_original_value():
    model = Residual(OldStyleAttention(16, 2), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    assert "8 ** -0.5" in pruned.code  # q.shape[-1] ** -0.5 keeps the original head_dim, 8
    assert "(1, 2, 9, 8)" not in pruned.code  # the batch size is not baked in


def test_a_parameter_shared_by_all_heads_is_gathered_per_head():
    """A head_dim-wide parameter broadcast over heads keeps its width; each head reads the entries of the
    channels it kept (a gather in the pruned graph), so heads choose their own channels and can go whole."""
    model = Residual(SeparateProjections(16, 2), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    (qk,) = _groups(analysis, "qk")
    (v,) = _groups(analysis, "v")
    assert not qk.shared_across_heads and len(qk.rows) == 2 and qk.heads == 2
    assert not v.shared_across_heads and len(v.rows) == 2
    assert pruned.get_submodule("block").temperature.shape == (8,)
    assert "gather_per_row" in pruned.code
    assert any(g.kind == "heads" and g.prunable for g in analysis.groups)
    _, _, without_a_head = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.0, head_ratio=0.5)
    assert without_a_head.get_parameter("block.q.weight").shape[0] == 8


def test_shared_depthwise_conv_on_v_forces_same_offsets():
    model = Residual(SharedDepthwiseOnV(16, 2), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    (v,) = _groups(analysis, "v")
    assert v.shared_across_heads and len(v.rows) == 1
    assert any(s.param == "block.dwc.weight" for s in v.members)
    dwc = pruned.get_submodule("block.dwc")
    assert dwc.weight.shape[0] == dwc.groups == dwc.out_channels == 4
    (qk,) = _groups(analysis, "qk")
    assert not qk.shared_across_heads and len(qk.rows) == 2


def test_heads_choose_their_own_channels():
    torch.manual_seed(1)
    model = Residual(OldStyleAttention(16, 2), 16).eval()
    analysis = fxprune.analyze(model, (torch.randn(1, TOKENS, 16),))
    plan = fxprune.plan(analysis, 0.5)
    rows = plan.removed[_groups(analysis, "v")[0].name]
    assert len(rows) == 2 and rows[0] != rows[1]


def test_linear_attention_mean_over_tokens_is_allowed():
    model = Residual(LinearAttention(16, 2), 16).eval()
    analysis, _, _ = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    assert all(g.prunable for g in _groups(analysis, "qk") + _groups(analysis, "v"))


def test_conv_mlp_with_batch_norm():
    model = ConvMlp(8, 12)
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, 8, 5, 5), 0.5)
    (mlp,) = _groups(analysis, "mlp")
    assert {s.param for s in mlp.members} >= {"bn.weight", "bn.running_mean", "bn.running_var", "fc1.weight", "fc2.weight"}
    assert pruned.get_submodule("bn").num_features == 6
    assert pruned.get_submodule("bn").running_mean.shape == (6,)


def test_cat_bias_members():
    model = Residual(CatBiasAttention(16, 2), 16).eval()
    analysis, _, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    (qk,) = _groups(analysis, "qk")
    assert "block.q_bias" in {s.param for s in qk.members}
    assert pruned.get_submodule("block").q_bias.shape == (8,)


def test_op_without_rule_freezes_its_channels_and_is_reported():
    model = UnknownOpMlp(8, 12).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 8), 0.5)
    frozen = analysis.group("fc1:other")  # the unknown op hides fc2's columns from the group
    assert not frozen.prunable and any("no rule" in r and "cumsum" in r for r in frozen.frozen)
    assert analysis.group("fc3:mlp").prunable
    assert pruned.get_submodule("fc1").out_features == 12
    assert pruned.get_submodule("fc3").out_features == 6
    assert any("cumsum" in op.target for op in analysis.unknown_ops)
    assert "cumsum" in str(analysis)


def test_chunk_becomes_split_when_q_k_and_v_widths_differ():
    model = Residual(ChunkedAttention(16, 2), 16).eval()
    analysis = fxprune.analyze(model, (torch.randn(1, TOKENS, 16),))
    qk = _groups(analysis, "qk")[0]
    plan = fxprune.Plan({qk.name: [[0, 1, 2], [0, 1, 2]]})  # q/k lose 3 of 8 per head, v keeps all
    pruned = fxprune.apply(analysis, plan)
    assert "split" in pruned.code and "[10, 10, 16]" in pruned.code
    assert masked_error(model, analysis, plan, pruned, torch.randn(2, TOKENS, 16)) < 1e-5


class EinsumAttention(torch.nn.Module):
    """Attention spelled with einsum (q·kᵀ and attn·v), optionally plus SAM's decomposed relative positions: an
    einsum of q with a head_dim-wide table every head shares."""

    def __init__(self, dim: int = 16, heads: int = 2, side: int = 3, rel_pos: bool = False) -> None:
        super().__init__()
        self.heads, self.side, self.rel_pos = heads, side, rel_pos
        self.qkv = torch.nn.Linear(dim, dim * 3)
        self.proj = torch.nn.Linear(dim, dim)
        self.table = torch.nn.Parameter(torch.randn(side, side, dim // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.einsum("bhnd,bhmd->bhnm", q, k) * 0.3
        if self.rel_pos:  # (B, heads, side, side, d) x (side, side', d) -> a bias per query row and key row
            rel = torch.einsum("bhywc,yzc->bhywz", q.reshape(B, self.heads, self.side, self.side, -1), self.table)
            attn = attn + rel.reshape(B, self.heads, N, self.side).repeat_interleave(self.side, dim=-1)
        out = torch.einsum("bhnm,bhmd->bhnd", attn.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def test_einsum_attention_prunes_like_matmul_attention():
    model = Residual(EinsumAttention(16, 2), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    (qk,) = _groups(analysis, "qk")
    (v,) = _groups(analysis, "v")
    assert qk.prunable and v.prunable and qk.heads == v.heads == 2 and not qk.shared_across_heads
    assert pruned.get_submodule("block.qkv").out_features < 48
    assert any(g.kind == "heads" and g.prunable for g in analysis.groups)
    _, _, fewer_heads = _prune_and_check(model, torch.randn(3, TOKENS, 16), 0.0, head_ratio=0.5)
    assert fewer_heads.get_submodule("block.qkv").out_features == 24
    assert fxprune.count_macs(pruned, (torch.randn(1, TOKENS, 16),)) < fxprune.count_macs(model, (torch.randn(1, TOKENS, 16),))


def test_einsum_with_a_table_every_head_shares_couples_the_same_offsets():
    model = Residual(EinsumAttention(16, 2, rel_pos=True), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    (qk,) = _groups(analysis, "qk")
    assert qk.prunable and qk.shared_across_heads and "block.table" in {s.param for s in qk.members}
    assert pruned.get_parameter("block.table").shape[-1] < 8


def test_einsum_with_a_repeated_index_freezes_what_it_touches():
    class Diagonal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h) + torch.einsum("bii->bi", h.reshape(-1, 8, 1).expand(-1, 8, 8)).reshape(x.shape)

    analysis = fxprune.analyze(Diagonal().eval(), (torch.randn(1, 8),))
    frozen = [g for g in analysis.groups if any(s.param == "fc1.weight" and s.dim == 0 for s in g.members)]
    assert frozen and any("repeated indices" in r for g in frozen for r in g.frozen)


class GatedMlp(torch.nn.Module):
    """Hidden channels multiplied by a one-channel gate split off the same projection (MobileViT-v2's query)."""

    def __init__(self, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc1, self.fc2 = torch.nn.Linear(dim, hidden + 1), torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.fc1(x).split([self.hidden, 1], dim=-1)
        return x + self.fc2(torch.relu(h) * torch.sigmoid(gate))


def test_a_one_channel_gate_broadcast_over_channels_stays_and_they_go_on_their_own():
    model = GatedMlp().eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 8), 0.5)
    hidden = [g for g in analysis.groups if g.prunable and any(s.param == "fc2.weight" for s in g.members)]
    assert len(hidden) == 1 and hidden[0].width == 12  # one atom per channel, not one for all twelve
    assert pruned.get_submodule("fc1").out_features == 7 and pruned.get_submodule("fc2").in_features == 6
    frozen = [r for g in analysis.groups if not g.prunable for r in g.frozen]
    assert any("one channel broadcast over the 12 channels" in r for r in frozen)


class NormedHidden(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = torch.nn.Conv2d(dim, hidden, 1), norm, torch.nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.norm(self.fc1(x)))


@pytest.mark.parametrize("norm, why", [
    (torch.nn.GroupNorm(1, 12), "normalised over these channels (one group)"),
    (torch.nn.GroupNorm(3, 12), "normalised in 3 groups whose count is fixed"),
])
def test_group_norm_keeps_the_channels_it_normalises(norm, why):
    analysis = fxprune.analyze(NormedHidden(norm).eval(), (torch.randn(1, 8, 5, 5),))
    hidden = [g for g in analysis.groups if any(s.param == "fc1.weight" and s.dim == 0 for s in g.members)]
    assert len(hidden) == 1 and not hidden[0].prunable
    assert {"norm.weight", "norm.bias", "fc2.weight"} <= {s.param for s in hidden[0].members}
    assert any(why in r for r in hidden[0].frozen)


def test_rms_norm_over_channels_allows_only_whole_sets():
    class Rms(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.fc2 = torch.nn.Linear(8, 12), torch.nn.RMSNorm(12), torch.nn.Linear(12, 8)
            self.fc3, self.fc4 = torch.nn.Linear(8, 12), torch.nn.Linear(12, 8)

        def forward(self, x):
            return self.fc2(self.norm(self.fc1(x))) + self.fc4(torch.relu(self.fc3(x)))

    model = Rms().eval()
    analysis, _, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 8), 0.5)
    normed = [g for g in analysis.groups if any(s.param == "norm.weight" for s in g.members)]
    assert len(normed) == 1 and any("normalised over these channels" in r for r in normed[0].frozen)
    assert pruned.get_submodule("fc1").out_features == 12 and pruned.get_submodule("fc3").out_features == 6


class ExportOnlyConvMlp(torch.nn.Module):
    """BatchNorm and a functional depthwise conv behind a branch on the input's size (symbolic tracing fails, so
    capture takes torch.export's ATen graph: aten.batch_norm, aten.conv2d with groups baked in)."""

    def __init__(self, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = torch.nn.Conv2d(dim, hidden, 1), torch.nn.BatchNorm2d(hidden), torch.nn.Conv2d(hidden, dim, 1)
        self.dw = torch.nn.Parameter(torch.randn(hidden, 1, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.hardswish(self.bn(self.fc1(x)))
        if h.shape[-1] > 1:
            h = torch.nn.functional.conv2d(h, self.dw, None, 1, 1, 1, h.shape[1])
        return x + self.fc2(h)


def test_export_graph_batch_norm_and_depthwise_conv_prune():
    model = ExportOnlyConvMlp()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, 8, 5, 5), 0.5)
    assert analysis.gm.meta.get(fxprune.meta.CAPTURE_METHOD) == "torch.export"
    (mlp,) = _groups(analysis, "mlp")
    assert {"bn.weight", "bn.running_var", "dw", "fc2.weight"} <= {s.param for s in mlp.members}
    assert pruned.get_parameter("dw").shape[0] == 6


class HeadsLastAttention(torch.nn.Module):
    """NesT's output layout: (B, heads, N, d) permuted to (B, N, d, heads) and flattened, so flat channel
    i * heads + h is channel i of head h (heads interleaved inside the channel dim)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, dim * 3)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.permute(0, 2, 3, 1).reshape(B, N, C))


def test_heads_interleaved_inside_the_channel_dim_keep_the_same_offsets():
    model = Residual(HeadsLastAttention(16, 2), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(3, TOKENS, 16), 0.5)
    (v,) = _groups(analysis, "v")
    assert v.prunable and v.shared_across_heads  # otherwise proj's kept columns would be out of order
    (qk,) = _groups(analysis, "qk")
    assert qk.prunable and not qk.shared_across_heads
    assert pruned.get_submodule("block.proj").in_features == 8
    _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.0, head_ratio=0.5)


class WindowedKv(torch.nn.Module):
    """HaloNet-style: keys and values read through Tensor.unfold windows over positions (channels untouched)."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q = torch.nn.Conv1d(dim, dim, 1)
        self.kv = torch.nn.Conv1d(dim, 2 * dim, 1)
        self.proj = torch.nn.Conv1d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 8)
        B, C, L = x.shape
        q = self.q(x).reshape(B, self.heads, -1, 2, 4).permute(0, 1, 3, 4, 2)  # B, h, blocks, 4, d
        kv = torch.nn.functional.pad(self.kv(x), [2, 2]).unfold(2, 8, 4)  # B, 2C, blocks, 8
        k, v = kv.reshape(B, 2, self.heads, -1, 2, 8).permute(1, 0, 2, 4, 5, 3).unbind(0)  # B, h, blocks, 8, d
        out = (q @ k.transpose(-1, -2)).softmax(-1) @ v  # B, h, blocks, 4, d
        return x + self.proj(out.permute(0, 1, 4, 2, 3).reshape(B, C, L))


def test_unfold_windows_over_positions_keep_channels_prunable():
    model = WindowedKv().eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(3, 8, 8), 0.5)
    assert all(g.prunable for g in _groups(analysis, "qk") + _groups(analysis, "v"))
    assert pruned.get_submodule("kv").out_channels == 8


def test_unfold_along_a_channel_dim_freezes_it():
    class UnfoldChannels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)

        def forward(self, x):
            h = self.fc1(x)
            return self.fc2(h) + h.unfold(-1, 2, 2).sum(-1).sum(-1, keepdim=True)

    analysis = fxprune.analyze(UnfoldChannels().eval(), (torch.randn(1, 3, 4),))
    hidden = [g for g in analysis.groups if any(s.param == "fc1.weight" and s.dim == 0 for s in g.members)]
    assert hidden and any("unfolded into sliding windows" in r for g in hidden for r in g.frozen)


class UpsampledAttention(torch.nn.Module):
    """LowFormer-style: attention on a downsampled map, its values read by a ConvTranspose2d (weight (in, out,
    k, k)), and a depthwise ConvTranspose2d after it."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Conv2d(dim, 3 * dim, 2, stride=2)
        self.up = torch.nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.dw = torch.nn.ConvTranspose2d(dim, dim, 3, padding=1, groups=dim)
        self.fc2 = torch.nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, 6, 6)
        B, C, H, W = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv.reshape(B, 3, self.heads, -1, (H // 2) * (W // 2)).transpose(-1, -2).unbind(1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(B, C, H // 2, W // 2)
        return x + self.fc2(self.dw(self.up(out)))


def test_conv_transpose_reads_values_and_its_outputs_prune():
    model = UpsampledAttention().eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, 8, 6, 6), 0.5)
    (v,) = _groups(analysis, "v")
    assert v.prunable and "up.weight" in {s.param for s in v.members}
    up, dw = pruned.get_submodule("up"), pruned.get_submodule("dw")
    assert up.weight.shape[0] == up.in_channels == 4  # v lost half its channels: up's input rows follow
    assert up.out_channels == up.weight.shape[1] * up.groups
    assert dw.weight.shape[0] == dw.groups == dw.in_channels == dw.out_channels == up.out_channels
    assert up.out_channels < 8  # up's outputs (with dw and fc2's columns) are a group of their own


class PositionLambda(torch.nn.Module):
    """LambdaNet's position lambdas: a Conv3d over (H, W, channels) with kernel (r, r, 1) sees each channel on
    its own, so the channels along its last spatial dim stay prunable."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.v = torch.nn.Conv2d(dim, dim, 1)
        self.lam = torch.nn.Conv3d(1, 3, (3, 3, 1), padding=(1, 1, 0))
        self.mix = torch.nn.Parameter(torch.randn(3))
        self.proj = torch.nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        v = self.v(x).permute(0, 2, 3, 1).unsqueeze(1)  # B, 1, H, W, C
        lam = self.lam(v)  # B, 3, H, W, C
        out = (lam * self.mix.reshape(1, 3, 1, 1, 1)).sum(1).permute(0, 3, 1, 2)
        return x + self.proj(out)


def test_conv3d_with_kernel_one_along_the_channel_dim_passes_channels():
    model = PositionLambda().eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, 8, 5, 5), 0.5)
    hidden = [g for g in analysis.groups if any(s.param == "v.weight" and s.dim == 0 for s in g.members)]
    assert len(hidden) == 1 and hidden[0].prunable and "proj.weight" in {s.param for s in hidden[0].members}
    assert pruned.get_submodule("v").out_channels == 4


def test_conv3d_with_a_wider_kernel_along_the_channel_dim_freezes_them():
    model = PositionLambda().eval()
    model.lam = torch.nn.Conv3d(1, 3, (3, 3, 3), padding=(1, 1, 1))
    analysis = fxprune.analyze(model, (torch.randn(1, 8, 5, 5),))
    hidden = [g for g in analysis.groups if any(s.param == "v.weight" and s.dim == 0 for s in g.members)]
    assert hidden and not hidden[0].prunable and any("convolution input has channel ids along dim 4" in r for r in hidden[0].frozen)


class AutocastOffAttention(torch.nn.Module):
    """EfficientViT-MIT's pattern: attention computed inside ``torch.autocast(enabled=False)``, behind a branch
    symbolic tracing cannot take (so capture uses torch.export, which wraps the block in a higher-order op)."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.inner = OldStyleAttention(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta":
            with torch.autocast(device_type=x.device.type, enabled=False):
                return x + self.inner(x)
        return x + self.inner(x)


def test_attention_inside_autocast_off_is_seen_through_export():
    model = AutocastOffAttention().eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.5)
    assert analysis.gm.meta.get(fxprune.meta.CAPTURE_METHOD) == "torch.export"
    assert not any("wrap_with_autocast" in op.target for op in analysis.unknown_ops)
    assert all(g.prunable for g in _groups(analysis, "qk") + _groups(analysis, "v"))


class SplitConvOnV(torch.nn.Module):
    """CoaT's convolutional position encoding: v's heads split between depthwise convs of different kernel
    sizes (heads 0 and 1 through one, head 2 through another), the result multiplied into q."""

    def __init__(self, dim: int = 12, heads: int = 3, side: int = 3) -> None:
        super().__init__()
        self.heads, self.side = heads, side
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        d = dim // heads
        self.convs = torch.nn.ModuleList([torch.nn.Conv2d(2 * d, 2 * d, 3, padding=1, groups=2 * d),
                                          torch.nn.Conv2d(d, d, 1, groups=d)])
        self.splits = [2 * d, d]
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        factor = q @ (k.softmax(dim=2).transpose(-1, -2) @ v)
        v_img = v.transpose(-1, -2).reshape(B, C, self.side, self.side)
        conv_v = torch.cat([conv(part) for conv, part in zip(self.convs, v_img.split(self.splits, dim=1))], dim=1)
        crpe = q * conv_v.reshape(B, self.heads, -1, N).transpose(-1, -2)
        return x + self.proj((factor + crpe).transpose(1, 2).reshape(B, N, C))


def test_heads_split_between_groups_keep_their_rows():
    model = Residual(SplitConvOnV(), 12).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, 9, 12), 0.5)
    qk = _groups(analysis, "qk")
    assert len(qk) == 2 and all(g.prunable for g in qk)
    assert sorted(g.heads for g in qk) == [1, 2]  # heads 0 and 1 with the first conv, head 2 with the second
    assert pruned.get_parameter("block.qkv.weight").shape[0] < 36


class NormedHeads(torch.nn.Module):
    """timm's qk_norm: one LayerNorm over head_dim that every head shares, and v unnormalised."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = torch.nn.LayerNorm(dim // heads), torch.nn.LayerNorm(dim // heads)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = torch.nn.functional.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def test_a_norm_weight_every_head_shares_lets_whole_heads_go():
    model = Residual(NormedHeads(), 16).eval()
    analysis = fxprune.analyze(model, (torch.randn(1, TOKENS, 16),))
    (qk,) = _groups(analysis, "qk")
    assert not qk.prunable and not qk.shared_across_heads and qk.heads == 2
    assert any(g.kind == "heads" and g.prunable for g in analysis.groups)
    _, _, pruned = _prune_and_check(model, torch.randn(2, TOKENS, 16), 0.0, head_ratio=0.5)
    assert pruned.get_submodule("block.qkv").out_features == 24
    assert pruned.get_submodule("block.q_norm").weight.shape == (8,)  # the shared weight keeps its width


@pytest.mark.parametrize("heads", [1, 2])
def test_interleaved_rotary_removes_channels_in_aligned_pairs(heads):
    """x[..., ::2] and x[..., 1::2] pair channel 2i with 2i + 1: pairs go whole, so the strided slices still
    pick each pair's halves after pruning; the shared cos/sin table is read per head."""
    model = Residual(InterleavedRotary(16, heads), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(3, TOKENS, 16), 0.5, head_ratio=0.5 if heads > 1 else 0)
    (qk,) = _groups(analysis, "qk")
    assert qk.prunable and qk.channels_per_atom == 2, qk.frozen
    original, kept = model.block.k.weight, pruned.get_parameter("block.k.weight")
    rows = sorted(int((original == row).all(1).nonzero()[0]) for row in kept)
    assert len(rows) < original.shape[0] and len(rows) % 2 == 0
    assert all(rows[i] % 2 == 0 and rows[i + 1] == rows[i] + 1 for i in range(0, len(rows), 2))  # aligned pairs


def test_a_strided_slice_over_part_of_the_channels_freezes_them():
    class Strided(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 12), torch.nn.Linear(3, 8)

        def forward(self, x):
            return self.fc2(self.fc1(x)[..., :6:2])

    analysis = fxprune.analyze(Strided(), (torch.randn(1, 8),))
    (hidden,) = [g for g in analysis.groups if "fc1" in g.name]
    assert any("channels are sliced with a step over part of their range" in why for why in hidden.frozen)


class InterleavedGlu(torch.nn.Module):
    """A gated MLP whose gate and value channels alternate in one projection: h[..., ::2] * silu(h[..., 1::2])."""

    def __init__(self, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(dim, 2 * hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h[..., ::2] * torch.nn.functional.silu(h[..., 1::2]))


def test_strided_slices_of_an_interleaved_glu_prune_in_pairs():
    model = Residual(InterleavedGlu(), 8).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(3, TOKENS, 8), 0.5)
    (mlp,) = [g for g in analysis.groups if "fc1" in g.name]
    assert mlp.prunable and mlp.width == 12, mlp.frozen  # one atom per (value, gate) pair
    assert pruned.get_parameter("block.fc1.weight").shape[0] == 12 and pruned.get_parameter("block.fc2.weight").shape[1] == 6


class PositionSlicedQkv(torch.nn.Module):
    """One fused projection sliced by position into q, k (a middle range) and v, as Phi-3 does."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.dim = heads, dim
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        y = self.qkv(x)
        q, k, v = y[..., :self.dim], y[..., self.dim:2 * self.dim], y[..., 2 * self.dim:]
        q, k, v = (t.view(B, N, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("head_ratio", [0.0, 0.5])
def test_a_middle_range_of_channels_moves_with_the_channels_kept_before_it(head_ratio):
    model = Residual(PositionSlicedQkv(), 16).eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(3, TOKENS, 16), 0.5, head_ratio=head_ratio)
    assert all(g.prunable for g in analysis.groups if g.kind in ("qk", "v", "heads"))
    kept = pruned.get_parameter("block.qkv.weight")
    rows = [int((model.block.qkv.weight == row).all(1).nonzero()[0]) for row in kept]
    parts = [sum(1 for r in rows if lo <= r < lo + 16) for lo in (0, 16, 32)]
    assert parts[0] == parts[1] and 0 < parts[0] < 16 and 0 < parts[2] < 16


class Resampled(torch.nn.Module):
    """A conv's channels interpolated as planes (dim 1), and a Linear's channels laid along a resampled dim."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.back = torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 3, 1)
        self.fc1, self.fc2 = torch.nn.Linear(3, 6), torch.nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        planes = self.back(torch.nn.functional.interpolate(self.conv(x), scale_factor=2.0, mode="bilinear"))
        rows = torch.nn.functional.interpolate(self.fc1(x.mean((2, 3)))[:, None, :], scale_factor=2.0, mode="linear")
        return planes.mean((2, 3)) + self.fc2(rows[:, 0])[:, :3]


def test_interpolation_passes_channels_and_freezes_resampled_ids():
    model = Resampled().eval()
    analysis, plan, pruned = _prune_and_check(model, torch.randn(2, 3, 4, 4), 0.5)
    conv = next(g for g in analysis.groups if "conv" in g.name)
    fc1 = next(g for g in analysis.groups if "fc1" in g.name)
    assert conv.prunable and pruned.get_parameter("conv.weight").shape[0] == 4
    assert any("resampled along this dim" in why for why in fc1.frozen)


class GroupedConvMlp(torch.nn.Module):
    """fc1 -> a grouped 1x1 conv (4 groups of 3 inputs, 6 outputs each) -> fc2; then a constant pad of the
    channels (a column of ones, EfficientViT-MIT's beside v) read back apart."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc1 = torch.nn.Conv2d(dim, 12, 1)
        self.grouped = torch.nn.Conv2d(12, 24, 1, groups=4)
        self.fc2 = torch.nn.Conv2d(24, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.grouped(torch.relu(self.fc1(x)))
        h = torch.nn.functional.pad(h.transpose(1, -1), (0, 1), value=1.0)
        h = (h[..., :-1] / (h[..., -1:] + 1.0)).transpose(1, -1)
        return x + self.fc2(h)


def test_grouped_conv_keeps_each_groups_own_input_columns():
    """fc1's channels have no weight column of a consumer of their own (the grouped conv reads them per group):
    the group is of kind "other", so it is asked for by kind."""
    torch.manual_seed(0)
    model = GroupedConvMlp().eval()
    snapshot = state_snapshot(model)
    x = torch.randn(3, 8, 5, 5)
    analysis = fxprune.analyze(model, (x[:1],))
    plan = fxprune.plan(analysis, 0.5, kinds=("mlp", "other"))
    pruned = fxprune.apply(analysis, plan)
    assert masked_error(model, analysis, plan, pruned, x) < 1e-5
    assert_unchanged(model, snapshot)
    grouped = pruned.get_submodule("grouped")
    assert grouped.groups == 4 and grouped.in_channels == pruned.get_submodule("fc1").out_channels == 8
    assert grouped.weight.shape == (12, 2, 1, 1) and grouped.out_channels == 12
    removed = plan.removed[next(g.name for g in analysis.groups if "fc1.weight" in {s.param for s in g.members})]
    assert len(removed) == 4 and len({tuple(r) for r in removed}) > 1  # each group chose its own inputs
