"""auto_prune's cost on DINOv2-S/14 (real weights, 112 px) with the accuracy benchmark's calibration batches
(8 batches of 16 digits images): wall time of one ``fxprune.auto_prune`` call with its defaults (indicator
training until the selection settles, sequential least-squares compensation), the steps it ran, and a
forward pass over the batches for scale. 2 threads; a table, no JSON.

    python benchmarks/auto_cost.py                  # targets 0.6 and 0.4
    python benchmarks/auto_cost.py --targets 0.6
"""
from __future__ import annotations

import argparse
import time

import torch

import fxprune
import offline
from fxprune import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = zoo.dinov2_small(112)
    images, _ = offline.digits(112)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train = order[360:]  # the accuracy benchmark's split and calibration batches
    calibration = [images[train[i:i + 16]] for i in range(0, 128, 16)]
    started = time.perf_counter()
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    forward = time.perf_counter() - started
    print("| MACs target | auto_prune (s) | indicator steps run | one forward pass over the batches (s) |")
    print("|---|---|---|---|")
    for target in args.targets:
        started = time.perf_counter()
        pruned = fxprune.auto_prune(model, calibration, target, example_inputs=(images[:1],), progress=False)
        seconds = time.perf_counter() - started
        print(f"| {target:.0%} | {seconds:.1f} | {fxprune.plan_of(pruned).options['steps_run']} | {forward:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
