"""Prune timm DeiT-S at a few ratios; print params, MACs, CPU latency and the masked-equivalence error.

    python examples/deit.py                                  # random init, ratios 0.3 and 0.5
    python examples/deit.py --checkpoint deit_small.pth      # your own weights (a state_dict file)
"""
from __future__ import annotations

import argparse
import json
import time

import timm
import torch

import fxprune
from fxprune.io import read_checkpoint
from fxprune.report import measure, table


def run(model: torch.nn.Module, settings: list[tuple[float, float]], batches: list[int], repeats: int,
        importance: str = "l2", untie: bool = False, activation_reference: bool = False) -> list[dict]:
    """One row for the original, one per (ratio, head_ratio) setting."""
    size = model.pretrained_cfg["input_size"]
    inputs = {b: torch.randn(b, *size) for b in batches}
    started = time.perf_counter()
    analysis = fxprune.analyze(model, (inputs[min(inputs)][:1],), untie_shared_convs=untie)
    prunable = [g for g in analysis.groups if g.prunable]
    print(f"{len(analysis.groups)} groups, {len(prunable)} prunable, analysis {time.perf_counter() - started:.2f}s")
    rows = [measure("original", model, inputs, repeats=repeats)]
    for ratio, head_ratio in settings:
        started = time.perf_counter()
        plan = fxprune.plan(analysis, ratio, head_ratio=head_ratio, importance=importance)
        pruned = fxprune.apply(analysis, plan)
        prune_s = time.perf_counter() - started
        name = f"ratio {ratio}" + (f" heads {head_ratio}" if head_ratio else "")
        reference = fxprune.mask(analysis, plan, activations=activation_reference)
        rows.append(measure(name, pruned, inputs, reference, repeats=repeats, prune_s=prune_s))
    return rows


def main(default_model: str = "deit_small_patch16_224", default_settings: str = "0.3:0 0.5:0",
         untie: bool = False, activation_reference: bool = False) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model, help="timm model name")
    parser.add_argument("--checkpoint", help="a state_dict (.pth / .safetensors) to load into the model")
    parser.add_argument("--settings", default=default_settings, help="space-separated ratio:head_ratio pairs")
    parser.add_argument("--importance", default="l2")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    if args.checkpoint:
        model.load_state_dict(read_checkpoint(args.checkpoint))
    settings = [tuple(float(v) for v in s.split(":")) for s in args.settings.split()]
    print(f"{args.model} (timm random init, {args.threads} threads):", end=" ")
    rows = run(model, settings, args.batches, args.repeats, args.importance, untie, activation_reference)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
