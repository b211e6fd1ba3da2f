"""Latency budgets against MACs budgets: what fraction of the time a pruned model keeps, estimated and measured.

For DeiT-S and Swin-T (random weights, 224 px, the example batch is the measured one), with fxprune's default
kinds and with the residual width too: plans at ``target_macs`` and at ``target_latency`` (both ``round_to``
8). Columns: MACs kept, the latency estimate kept (``fxprune/latency_budget.py``: node times of the original
scaled by the work each keeps; for the MACs plan from a profile of its own), the measured latency kept (median
of interleaved runs against the original, 2 threads) and the planning time (the latency plan times every node
of the original once). A latency budget meets its target where measured ≈ estimated.

    python benchmarks/latency_budget.py                 # batch 8, target 0.5; table + results/latency_budget.json
    python benchmarks/latency_budget.py --batch 1 --target 0.6 --rounds 20
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch

import fxprune
from fxprune.allocate import DEFAULT_KINDS
from fxprune.latency_budget import Estimator, profile
from speed import MODELS, interleaved_latency

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | kinds | budget | MACs kept | latency kept, estimated | latency kept, measured | plan (s) |")
    print("|---|---|---|---|---|---|---|")
    for label in args.models:
        name, size = MODELS[label]
        model = timm.create_model(name).eval()
        x = torch.randn(args.batch, 3, size, size)
        analysis = fxprune.analyze(model, (x,))
        estimate = Estimator(analysis, profile(analysis))
        nothing = torch.zeros(analysis.atoms.count, dtype=torch.bool)
        variants, facts = {"original": model}, {}
        for kinds in (DEFAULT_KINDS, (*DEFAULT_KINDS, "residual")):
            for budget in ("macs", "latency"):
                started = time.perf_counter()
                plan = fxprune.plan(analysis, round_to=8, kinds=kinds, **{f"target_{budget}": args.target})
                seconds = time.perf_counter() - started
                key = f"{','.join(kinds)} / {budget}"
                variants[key] = fxprune.apply(analysis, plan)
                estimated = plan.options["reached"] if budget == "latency" else \
                    estimate(plan.removed_atoms(analysis)) / estimate(nothing)
                facts[key] = {"kinds": list(kinds), "budget": budget, "plan_s": round(seconds, 2),
                              "macs_kept": fxprune.count_macs(variants[key], (x,)) / fxprune.count_macs(model, (x,)),
                              "latency_kept_estimated": estimated}
        measured = interleaved_latency(variants, x, args.rounds)
        for key, fact in facts.items():
            fact["latency_kept_measured"] = measured[key] / measured["original"]
            row = {"model": label, "batch": args.batch, "target": args.target, "original_ms": measured["original"], **fact}
            rows.append(row)
            print(f"| {label} b{args.batch} | {','.join(fact['kinds'])} | {fact['budget']} {args.target:.0%} | "
                  f"{fact['macs_kept']:.3f} | {fact['latency_kept_estimated']:.3f} | {fact['latency_kept_measured']:.3f} | "
                  f"{fact['plan_s']:.1f} |", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency_budget.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
