"""What the Hugging Face rules must achieve beyond exactness (tests/test_hf.py checks that): the structure
of what is pruned. Grouped-query attention loses whole kv groups, rotary q/k channels go in rotation pairs
chosen per kv group, gated MLPs are MLPs, GPT-2's Conv1D prunes like a Linear, and a pruned model accepts
other batch sizes and sequence lengths."""
from __future__ import annotations

import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")

from helpers import randomize  # noqa: E402


def _llama(kv_heads: int = 2, heads: int = 4, head_dim: int = 8, layers: int = 1, attn: str = "sdpa"):
    config = transformers.LlamaConfig(hidden_size=heads * head_dim, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, intermediate_size=48, vocab_size=50)
    config._attn_implementation = attn
    return randomize(transformers.LlamaModel(config)).eval()


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(seed))


def _groups(analysis) -> dict[str, object]:
    return {g.kind: g for g in analysis.groups if g.kind != "other"}


def test_llama_groups_follow_kv_heads_rotary_pairs_and_gated_mlp():
    analysis = fxprune.analyze(_llama(kv_heads=2), example_inputs=(_tokens(2, 5),))
    groups = _groups(analysis)
    assert set(groups) == {"qk", "v", "mlp", "heads"}
    assert all(g.prunable for g in groups.values()), [(g.name, g.frozen) for g in groups.values()]
    assert groups["heads"].width == 2  # one head atom per kv group
    assert len(groups["qk"].rows) == 2 and groups["qk"].channels_per_atom == 2  # rotation pairs, per kv group
    assert groups["qk"].head_dim * 2 == 8
    assert len(groups["v"].rows) == 2


def test_rotary_pairs_are_removed_together_and_kv_groups_choose_their_own():
    model = _llama(kv_heads=2)
    pruned = fxprune.prune(model, 0.5, example_inputs=(_tokens(2, 5),))
    k_rows = pruned.get_parameter("layers.0.self_attn.k_proj.weight")
    original = model.layers[0].self_attn.k_proj.weight
    kept = [int((original == row).all(1).nonzero()[0]) for row in k_rows]  # original row of every kept row
    per_group = [sorted(i % 8 for i in kept if i // 8 == g) for g in range(2)]
    for offsets in per_group:
        assert len(offsets) == 4
        assert all((i + 4) % 8 in offsets for i in offsets)  # channel i goes with its rotation partner i ± 4
    assert per_group[0] != per_group[1]  # each kv group picks its own pairs (random weights differ)


def test_head_ratio_removes_whole_kv_groups():
    model = _llama(kv_heads=2, heads=4)
    pruned = fxprune.prune(model, 0.0, example_inputs=(_tokens(2, 5),), head_ratio=0.5)
    attention = "layers.0.self_attn"
    assert pruned.get_parameter(f"{attention}.k_proj.weight").shape[0] == 8  # one kv head of 8 channels left
    assert pruned.get_parameter(f"{attention}.v_proj.weight").shape[0] == 8
    assert pruned.get_parameter(f"{attention}.q_proj.weight").shape[0] == 16  # its two query heads
    assert pruned.get_parameter(f"{attention}.o_proj.weight").shape[1] == 16


def _kept_rows(original: torch.Tensor, kept: torch.Tensor) -> list[int]:
    return sorted(int((original == row).all(1).nonzero()[0]) for row in kept)


def test_q_heads_removes_the_same_query_heads_count_inside_every_kv_group():
    """heads="q_heads": 8 query heads in 2 kv groups lose 2 query heads per group (their q rows and o columns);
    k and v keep every row; the repeat count baked in the graph follows (4 -> 2 copies per kv head)."""
    model = _llama(kv_heads=2, heads=8, layers=2)
    pruned = fxprune.prune(model, 0.0, example_inputs=(_tokens(2, 5),), head_ratio=0.5, heads="q_heads")
    attention = model.layers[0].self_attn
    assert pruned.get_parameter("layers.0.self_attn.k_proj.weight").shape == attention.k_proj.weight.shape
    assert pruned.get_parameter("layers.0.self_attn.v_proj.weight").shape == attention.v_proj.weight.shape
    q_rows = _kept_rows(attention.q_proj.weight, pruned.get_parameter("layers.0.self_attn.q_proj.weight"))
    heads_kept = sorted({r // 8 for r in q_rows})
    assert len(q_rows) == 32 and [sum(1 for h in heads_kept if h // 4 == g) for g in range(2)] == [2, 2]
    assert pruned.get_parameter("layers.0.self_attn.o_proj.weight").shape == (64, 32)
    plan = fxprune.Plan.from_json(fxprune.plan_of(pruned).to_json())  # the query heads survive a round trip
    assert plan.q_heads == fxprune.plan_of(pruned).q_heads and len(plan.q_heads) == 2
    reference = fxprune.mask(model, plan, example_inputs=(_tokens(2, 5),))
    for batch, length in [(1, 3), (3, 11)]:
        tokens = _tokens(batch, length, seed=5)
        with torch.no_grad():
            assert fxprune.relative_error(pruned(tokens).last_hidden_state, reference(tokens).last_hidden_state) < 1e-5


def test_kv_groups_may_drop_different_query_heads():
    """A plan that removes query head 1 of the first kv group and query head 0 of the second: the repeat count
    is per kv group (1 copy each), not the query heads removed from every group (none)."""
    model = _llama(kv_heads=2, heads=4)
    analysis = fxprune.analyze(model, example_inputs=(_tokens(2, 5),))
    (heads,) = [g for g in analysis.groups if g.kind == "heads"]
    plan = fxprune.Plan({}, q_heads={heads.name: [[1], [0]]})
    pruned = fxprune.apply(analysis, plan)
    q_rows = _kept_rows(model.layers[0].self_attn.q_proj.weight, pruned.get_parameter("layers.0.self_attn.q_proj.weight"))
    assert q_rows == list(range(0, 8)) + list(range(24, 32))  # query heads 0 and 3 stay
    reference = fxprune.mask(model, plan, example_inputs=(_tokens(2, 5),))
    tokens = _tokens(3, 7, seed=7)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(tokens).last_hidden_state, reference(tokens).last_hidden_state) < 1e-5
    with pytest.raises(fxprune.PlanError):
        fxprune.apply(analysis, fxprune.Plan({}, q_heads={heads.name: [[1], []]}))  # unequal counts per kv group


def test_multi_query_attention_loses_query_heads_only_with_q_heads():
    model = _llama(kv_heads=1, heads=4)
    analysis = fxprune.analyze(model, example_inputs=(_tokens(2, 5),))
    (heads,) = [g for g in analysis.groups if g.kind == "heads"]
    assert not heads.prunable and any("multi-query attention" in why and "q_heads" in why for why in heads.frozen)
    kept = fxprune.prune(analysis, 0.0, head_ratio=0.5)  # kv groups: nothing to remove, the single kv head stays
    assert kept.get_parameter("layers.0.self_attn.q_proj.weight").shape == (32, 32)
    pruned = fxprune.prune(analysis, 0.0, head_ratio=0.5, heads="q_heads")
    assert pruned.get_parameter("layers.0.self_attn.q_proj.weight").shape == (16, 32)
    assert pruned.get_parameter("layers.0.self_attn.k_proj.weight").shape == (8, 32)
    reference = fxprune.mask(model, fxprune.plan_of(pruned), example_inputs=(_tokens(2, 5),))
    tokens = _tokens(3, 7, seed=6)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(tokens).last_hidden_state, reference(tokens).last_hidden_state) < 1e-5


@pytest.mark.parametrize("options", [dict(heads="query"), dict(heads="q_heads", target_macs=0.5)])
def test_heads_option_refuses_what_it_cannot_do(options):
    with pytest.raises(fxprune.InvalidArgumentError):
        fxprune.plan(fxprune.analyze(_llama(), example_inputs=(_tokens(2, 5),)), **{"head_ratio": 0.5, **options})


@pytest.mark.parametrize("batch, length", [(1, 3), (3, 11)])
def test_pruned_decoder_runs_at_other_batch_sizes_and_lengths(batch, length):
    model = _llama(kv_heads=2, layers=2)
    pruned = fxprune.prune(model, 0.25, example_inputs=(_tokens(2, 5),), head_ratio=0.5)
    reference = fxprune.mask(model, fxprune.plan_of(pruned), example_inputs=(_tokens(2, 5),))
    tokens = _tokens(batch, length, seed=3)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(tokens).last_hidden_state, reference(tokens).last_hidden_state) < 1e-5


def test_gpt2_conv1d_prunes_qk_v_heads_and_mlp():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=50, n_positions=16)
    model = randomize(transformers.GPT2Model(config)).eval()
    analysis = fxprune.analyze(model, example_inputs=(_tokens(2, 5),))
    groups = _groups(analysis)
    assert set(groups) == {"qk", "v", "mlp", "heads"} and all(g.prunable for g in groups.values())
    pruned = fxprune.prune(model, 0.25, example_inputs=(_tokens(2, 5),))
    assert pruned.get_parameter("h.0.mlp.c_fc.weight").shape == (32, 96)  # Conv1D stores [in, out]


def test_gptj_interleaved_rotary_removes_aligned_pairs_per_head():
    """GPT-J rotates channels 2i and 2i + 1 together (x[..., ::2], x[..., 1::2]; cos/sin repeat_interleave'd):
    q/k channels go in those pairs, each head choosing its own, and whole heads can go."""
    config = transformers.GPTJConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=8, n_inner=48, vocab_size=50,
                                     n_positions=16, bos_token_id=1, eos_token_id=2)
    model = randomize(transformers.GPTJModel(config)).eval()
    analysis = fxprune.analyze(model, example_inputs=(_tokens(2, 5),))
    groups = _groups(analysis)
    assert all(g.prunable for g in groups.values()), [(g.name, g.frozen) for g in groups.values()]
    assert groups["qk"].channels_per_atom == 2 and len(groups["qk"].rows) == 4
    pruned = fxprune.prune(analysis, 0.5, head_ratio=0.5)
    original, kept = model.h[0].attn.k_proj.weight, pruned.get_parameter("h.0.attn.k_proj.weight")
    rows = sorted(int((original == row).all(1).nonzero()[0]) for row in kept)
    assert len(rows) == 8  # two heads of four channels
    assert all(rows[i] % 2 == 0 and rows[i + 1] == rows[i] + 1 for i in range(0, 8, 2))


def test_phi3_fused_qkv_sliced_by_position_prunes_q_k_v_and_kv_groups():
    """Phi-3 slices its fused qkv_proj by position (q = [:32], k = [32:48], a middle range, v = [48:]): each
    range keeps its own surviving rows and the slice bounds move with them; gate_up_proj is a gated MLP."""
    config = transformers.Phi3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=24, vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = randomize(transformers.Phi3Model(config)).eval()
    analysis = fxprune.analyze(model, example_inputs=(_tokens(2, 5),))
    groups = _groups(analysis)
    assert set(groups) == {"qk", "v", "mlp", "heads"}
    assert all(g.prunable for g in groups.values()), [(g.name, g.frozen) for g in groups.values()]
    pruned = fxprune.prune(analysis, 0.5, head_ratio=0.5)
    original, kept = model.layers[0].self_attn.qkv_proj.weight, pruned.get_parameter("layers.0.self_attn.qkv_proj.weight")
    rows = [int((original == row).all(1).nonzero()[0]) for row in kept]
    assert rows == sorted(rows)
    parts = [sum(1 for r in rows if lo <= r < hi) for lo, hi in ((0, 32), (32, 48), (48, 64))]
    assert parts == [8, 4, 4]  # one kv group left: its two query heads and its k and v, each at half width
    assert pruned.get_parameter("layers.0.self_attn.o_proj.weight").shape == (32, 8)
    assert pruned.get_parameter("layers.0.mlp.gate_up_proj.weight").shape == (24, 32)  # 12 gate + 12 up rows
    reference = fxprune.mask(model, fxprune.plan_of(pruned), example_inputs=(_tokens(2, 5),))
    with torch.no_grad():
        tokens = _tokens(3, 9, seed=4)
        assert fxprune.relative_error(pruned(tokens).last_hidden_state, reference(tokens).last_hidden_state) < 1e-5


def test_phi3_v_range_moves_when_only_query_heads_go():
    """Query heads removed inside the kv groups shorten q's range of the fused qkv_proj while k and v keep every
    row: k's and v's ranges must start earlier all the same (v = [48:] once started at 48 whatever it kept)."""
    config = transformers.Phi3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=24, vocab_size=50, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = randomize(transformers.Phi3Model(config)).eval()
    pruned = fxprune.prune(model, 0.0, example_inputs=(_tokens(2, 5),), head_ratio=0.5, heads="q_heads")
    assert pruned.get_parameter("layers.0.self_attn.qkv_proj.weight").shape == (48, 32)  # 16 q + 16 k + 16 v rows
    reference = fxprune.mask(model, fxprune.plan_of(pruned), example_inputs=(_tokens(2, 5),))
    with torch.no_grad():
        tokens = _tokens(3, 9, seed=4)
        assert fxprune.relative_error(pruned(tokens).last_hidden_state, reference(tokens).last_hidden_state) < 1e-5


def test_a_single_key_value_head_keeps_its_rotary_channels_prunable_per_layer():
    """Multi-query attention: the one key head meets the rotary tables every layer shares; read through a
    gather, they no longer tie the layers' key channels together, so q/k channels prune."""
    model = _llama(kv_heads=1, heads=4, layers=2)
    analysis = fxprune.analyze(model, example_inputs=(_tokens(2, 5),))
    qk = [g for g in analysis.groups if g.kind == "qk"]
    assert len(qk) == 2 and all(g.prunable for g in qk), [(g.name, g.frozen) for g in qk]
    pruned = fxprune.prune(analysis, 0.5)
    assert pruned.get_parameter("layers.1.self_attn.k_proj.weight").shape[0] == 4


@pytest.mark.parametrize("family", ["GPTJ", "GPTNeoX"])
def test_partial_rotary_prunes_rotated_and_passed_channels_apart(family):
    """Rotary on the first half of each head (x[..., :rotary_dim] rotated, x[..., rotary_dim:] passed): the
    rotated pairs and the passed channels are two q/k groups, each keeping the same count in every head, so
    the slice at rotary_dim still splits every head where it should."""
    if family == "GPTJ":
        config = transformers.GPTJConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_inner=48, vocab_size=50,
                                         n_positions=16, bos_token_id=1, eos_token_id=2)
    else:
        config = transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, rotary_pct=0.5,
                                            intermediate_size=48, vocab_size=50, bos_token_id=1, eos_token_id=2)
    model = randomize(getattr(transformers, f"{family}Model")(config)).eval()
    analysis = fxprune.analyze(model, example_inputs=(_tokens(2, 5),))
    qk = [g for g in analysis.groups if g.kind == "qk"]
    assert len(qk) == 2 and all(g.prunable for g in qk), [(g.name, g.frozen) for g in qk]
    assert sorted(g.channels_per_atom for g in qk) == [1, 2]  # passed channels alone, rotated ones in pairs
    pruned = fxprune.prune(analysis, 0.5)
    reference = fxprune.mask(model, fxprune.plan_of(pruned), example_inputs=(_tokens(2, 5),))
    tokens = _tokens(3, 9, seed=8)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(tokens).last_hidden_state, reference(tokens).last_hidden_state) < 1e-5
    assert fxprune.count_params(pruned) < fxprune.count_params(model)


def test_beit_relative_position_table_interpolated_per_head_follows_the_kept_heads():
    """BEiT resamples its relative position table (one plane per head) with aten.upsample_bilinear2d: the
    heads pass through the interpolation, so whole heads go and the table loses their columns."""
    from hf_models import Arch, build, inputs

    model = build("BEiT", Arch(heads=4, head_dim=8, layers=1))
    generator = torch.Generator().manual_seed(0)
    analysis = fxprune.analyze(model, example_inputs=inputs("BEiT", 1, 6, generator))
    (heads,) = [g for g in analysis.groups if g.kind == "heads"]
    assert heads.prunable, heads.frozen
    pruned = fxprune.prune(analysis, 0.25, head_ratio=0.5)
    table = "layers.0.relative_position_bias.relative_position_bias_table"
    assert pruned.get_parameter(table).shape[1] == 2
    reference = fxprune.mask(model, fxprune.plan_of(pruned), example_inputs=inputs("BEiT", 1, 6, generator))
    (images,) = inputs("BEiT", 3, 6, generator)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(images).last_hidden_state, reference(images).last_hidden_state) < 1e-5


def test_swinv2_cosine_attention_lets_heads_choose_channels_and_go_whole():
    """Swin-v2 divides q and k by their per-head norm (F.normalize: a norm expand_as'd back over each head's
    channels): the copies are per head, so heads keep their own channel offsets and whole heads go, with
    their logit_scale and their output of the continuous position bias MLP."""
    from hf_models import Arch, build, inputs

    model = build("Swinv2", Arch(heads=4, head_dim=8, layers=1))
    generator = torch.Generator().manual_seed(0)
    analysis = fxprune.analyze(model, example_inputs=inputs("Swinv2", 1, 6, generator))
    first = [g for g in analysis.groups if g.name.startswith("encoder.layers.0.blocks.0.")]
    assert all(g.prunable for g in first if g.kind in ("qk", "heads")), [(g.name, g.frozen) for g in first]
    assert not next(g for g in first if g.kind == "qk").shared_across_heads
    pruned = fxprune.prune(analysis, 0.25, head_ratio=0.5)
    attention = "encoder.layers.0.blocks.0.attention.self"
    assert pruned.get_parameter(f"{attention}.logit_scale").shape[0] == 2
    assert pruned.get_parameter(f"{attention}.continuous_position_bias_mlp.2.weight").shape[0] == 2
    reference = fxprune.mask(model, fxprune.plan_of(pruned), example_inputs=inputs("Swinv2", 1, 6, generator))
    (images,) = inputs("Swinv2", 3, 6, generator)
    with torch.no_grad():
        assert fxprune.relative_error(pruned(images).last_hidden_state, reference(images).last_hidden_state) < 1e-5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_swin_relative_position_bias_follows_the_kept_heads(attn):
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[4], window_size=4)
    config._attn_implementation = attn
    model = randomize(transformers.SwinModel(config)).eval()
    pruned = fxprune.prune(model, 0.0, example_inputs=(torch.randn(2, 3, 32, 32),), head_ratio=0.5)
    table = "encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table"
    assert pruned.get_parameter(table).shape[1] == 2
    with torch.no_grad():
        assert pruned(torch.randn(3, 3, 32, 32)).last_hidden_state.shape == (3, 64, 16)


class _MaskedHeads(torch.nn.Module):
    """Attention whose per-head additive mask comes out of an op without a rule (cummax)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.bias = torch.nn.Parameter(torch.randn(4, 6, 6))
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 4, 4).permute(2, 0, 3, 1, 4)
        mask = torch.cummax(self.bias, dim=-1).values.unsqueeze(0)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], 16))


def test_a_mask_whose_heads_cannot_follow_freezes_the_heads():
    analysis = fxprune.analyze(_MaskedHeads().eval(), example_inputs=(torch.randn(2, 6, 16),))
    heads = [g for g in analysis.groups if g.kind == "heads"]
    assert heads and not heads[0].prunable
    assert any("cannot follow the heads" in reason for reason in heads[0].frozen)


@pytest.mark.parametrize("importance", ["taylor", "attention"])
def test_calibration_batches_carry_every_input_of_a_token_model(importance):
    """(input_ids, attention_mask) batches, as tuples or tokenizer-style dicts, reach the model whole: the
    padding decides the scores (a criterion that dropped the mask would score the same with and without)."""
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                                     vocab_size=50)
    model = randomize(transformers.BertModel(config)).eval()
    ids = _tokens(4, 8)
    padded = torch.ones(4, 8, dtype=torch.long)
    padded[:, 3:] = 0
    example = (ids[:2], padded[:2])
    analysis = fxprune.analyze(model, example_inputs=example)
    from_tuples = fxprune.importance.score(analysis, importance, data=[(ids, padded)])
    from_dicts = fxprune.importance.score(analysis, importance, data=[{"attention_mask": padded, "input_ids": ids}])
    unpadded = fxprune.importance.score(analysis, importance, data=[(ids, torch.ones_like(padded))])
    assert torch.allclose(from_tuples, from_dicts)
    assert not torch.allclose(from_tuples, unpadded)
    plan = fxprune.plan(analysis, 0.5, importance=importance, data=[(ids, padded)])
    pruned = fxprune.apply(analysis, plan, reweight_data=[(ids, padded)])
    assert pruned(ids, padded).last_hidden_state.shape == (4, 8, 32)


def test_a_norm_over_every_head_freezes_whole_heads_instead_of_planning_what_apply_refuses():
    """Olmo2 normalises q (and k) over all heads at once: removing a head would change every other head's
    statistics. The heads group is frozen with that reason, so head_ratio plans nothing apply must refuse (it
    used to plan the heads away and apply raised PlanError); v and the MLP still shrink."""
    import transformers
    from hf_models import randomize

    config = transformers.Olmo2Config(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=48, max_position_embeddings=32)
    model = randomize(transformers.Olmo2ForCausalLM(config)).eval()
    ids = torch.randint(3, 40, (1, 6), generator=torch.Generator().manual_seed(0))
    analysis = fxprune.analyze(model, (ids,))
    heads = [g for g in analysis.groups if g.kind == "heads"]
    assert heads and all(not g.prunable and any("a head cannot go alone" in r for r in g.frozen) for g in heads)
    with pytest.warns(fxprune.PruningShortfallWarning):
        plan = fxprune.plan(analysis, 0.25, head_ratio=0.5)
    assert not any(name.endswith(":heads") for name in plan.removed)
    pruned = fxprune.apply(analysis, plan)
    assert fxprune.count_params(pruned) < fxprune.count_params(model)
