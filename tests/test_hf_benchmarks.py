"""The Hugging Face benchmarks' helpers (benchmarks/minilm.py, benchmarks/llama_scale.py) on tiny random models."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import offline  # noqa: E402

transformers = pytest.importorskip("transformers")


def test_sentences_are_distinct_deterministic_and_varied():
    texts = offline.sentences(300, seed=0)
    assert len(texts) == len(set(texts)) == 300 and texts == offline.sentences(300, seed=0)
    assert texts != offline.sentences(300, seed=1)
    assert sum(t.endswith("?") for t in texts) > 30  # questions as well as statements
    assert len({len(t.split()) for t in texts}) > 10


def _tiny_encoder():
    import minilm

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return minilm.SentenceEncoder(transformers.BertModel(config, add_pooling_layer=False).eval()).eval()


def _batch(batch: int, tokens: int, padded: int = 0) -> tuple:
    ids = torch.randint(1, 100, (batch, tokens), generator=torch.Generator().manual_seed(batch + tokens))
    mask = torch.ones_like(ids)
    mask[0, tokens - padded:] = 0
    return ids, mask


def test_packed_encoder_computes_the_encoder_and_pooling_ignores_padding():
    import minilm

    encoder = _tiny_encoder()
    ids, mask = _batch(3, 7, padded=2)
    with torch.no_grad():
        expected = encoder(ids, mask)
        assert torch.allclose(minilm.TwoInputs(minilm.PackedEncoder(encoder))(ids, mask), expected)
        assert torch.allclose(encoder(ids[:1, :5], mask[:1, :5]), expected[:1], atol=1e-5)
    assert torch.allclose(expected.norm(dim=-1), torch.ones(3))
    scores = minilm.similarity(expected, expected)
    assert scores["cosine"] == pytest.approx(1.0) and scores["similarity_corr"] == pytest.approx(1.0)


def test_torch_pruning_bert_recipe_keeps_the_residual_width_and_reaches_the_macs():
    pytest.importorskip("torch_pruning")
    import fxprune
    import peer

    encoder = _tiny_encoder()
    example = _batch(1, 8)
    pruned, _, note = peer.bisect_to_macs(lambda r: peer.prune_bert_at_ratio(encoder, example, r), encoder, example,
                                         0.6, log=lambda m: None)
    assert pruned is not None, note
    assert abs(fxprune.count_macs(pruned, example) / fxprune.count_macs(encoder, example) - 0.6) < 0.05
    layer = pruned.bert.encoder.layer[0]
    assert layer.attention.output.dense.out_features == 32  # residual width kept
    assert layer.attention.self.query.out_features < 32 and layer.intermediate.dense.out_features < 64
    with torch.no_grad():
        assert pruned(*_batch(3, 6, padded=2)).shape == (3, 32)


def test_llama_scale_runs_every_phase_and_reports_what_was_pruned():
    import llama_scale

    args = argparse.Namespace(hidden=64, intermediate=96, layers=1, heads=4, kv_heads=2, vocab=50, dtype="float32")
    model = llama_scale.build(args)
    phases, state = llama_scale.run_phases(model, (torch.randint(0, 50, (1, 6)),), 0.5, log=lambda m: None)
    assert [p["phase"] for p in phases] == list(llama_scale.PHASES) and not any("error" in p for p in phases)
    assert all(p["peak_bytes"] >= p["after_bytes"] > 0 for p in phases)
    before, after = llama_scale.params_by_projection(model), llama_scale.params_by_projection(state["pruned"])
    assert before["v_proj"] == 64 * 32 and sum(after.values()) < sum(before.values())
    kinds = llama_scale.kinds_pruned(state["analysis"], state["plan"])
    removed = sum(k["removed"] for k in kinds.values())
    assert removed > 0 and all(k["removed"] <= k["channels"] for k in kinds.values())
    assert llama_scale.model_bytes(model) >= 4 * sum(before.values())


def test_hf_benchmark_row_prunes_and_reports(monkeypatch):
    """``benchmarks/hf.py``'s row on a small Llama: pruned, checked at other shapes, no error in the row (the
    row once unpacked four values where its helper returned five, and every row of the table said so)."""
    import hf
    from hf_models import Arch

    monkeypatch.setattr(hf, "ARCH", Arch(heads=4, head_dim=8, layers=1, intermediate=32, kv_groups=2))
    row = hf.check(hf.FAMILIES["Llama"], "sdpa")
    assert "error_message" not in row, row.get("trace")
    assert row["runs_at_other_shapes"] and row["error"] < 1e-5 and row["params_kept"] < 1
    assert "ops without rules" not in row["why_not"]
