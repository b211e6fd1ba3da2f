"""Compensation cost: ``fxprune.apply`` on timm ViT-S (random init, 224 px, ratio 0.5, l2) without and with each
compensation, from 8 calibration batches, next to one plain forward pass of the unpruned model over the same
batches (what any data-driven step costs at least). Wall clock, 2 threads, the fastest of 2; a table, no JSON.

    python benchmarks/compensation_cost.py                 # 8 batches of 4
    python benchmarks/compensation_cost.py --batch 4 16
"""
from __future__ import annotations

import argparse
import time

import timm
import torch

import fxprune


def fastest(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="*", default=[4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = timm.create_model("vit_small_patch16_224").eval()
    analysis = fxprune.analyze(model, (torch.randn(1, 3, 224, 224),))
    plan = fxprune.plan(analysis, 0.5)
    print("| batches | forward pass over them (s) | no compensation (s) | least_squares (s) | sequential (s) | reweight (s) |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch:
        data = [torch.randn(batch, 3, 224, 224) for _ in range(8)]
        with torch.no_grad():
            forward = fastest(lambda: [model(x) for x in data])
        cells = [fastest(lambda: fxprune.apply(analysis, plan, verify=False))]
        for compensation in ("least_squares", "sequential", "reweight"):
            cells.append(fastest(lambda: fxprune.apply(analysis, plan, reweight_data=data, compensation=compensation,
                                                      verify=False)))
        print(f"| 8 x {batch} | {forward:.2f} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
