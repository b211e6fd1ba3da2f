"""Pruning cost: wall time and peak memory of capture + analysis + rewrite + self-check, against Torch-Pruning's
time for the same job (head-dim and MLP channel pruning at ratio 0.5, magnitude importance). The self-check's
share is the difference to the same call with ``verify=False``.

    python benchmarks/cost.py                       # table + benchmarks/results/cost.json
    python benchmarks/cost.py --markdown --no-peer  # without Torch-Pruning (pip install torch-pruning)

Timings are wall clock on this machine (one run each, after a warm-up): compare within one run only. Memory
is how far the call raised the process's peak resident set (ru_maxrss; 0 when it stayed below an earlier
peak), so it is rough.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from pathlib import Path

import timm
import torch

import fxprune
import peer

MODELS = {
    "ViT-Ti": ("vit_tiny_patch16_224", {}),
    "ViT-S": ("vit_small_patch16_224", {}),
    "ViT-B": ("vit_base_patch16_224", {}),
    "Swin-T": ("swin_tiny_patch4_window7_224", {}),
    "Swin-S": ("swin_small_patch4_window7_224", {}),
    "Swin-B": ("swin_base_patch4_window7_224", {}),
    "ViT-S depth 24": ("vit_small_patch16_224", {"depth": 24}),
    "ViT-S depth 48": ("vit_small_patch16_224", {"depth": 48}),
    "ViT-S depth 96": ("vit_small_patch16_224", {"depth": 96}),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fxprune_cost(model: torch.nn.Module, verify: bool = True) -> tuple[float, float]:
    gc.collect()
    before = _rss_mb()
    started = time.perf_counter()
    fxprune.prune(model, 0.5, verify=verify)
    return time.perf_counter() - started, max(0.0, _rss_mb() - before)


def torch_pruning_cost(model: torch.nn.Module) -> float | None:
    """Torch-Pruning's ViT recipe (benchmarks/peer.py: head dims and MLP channels, Swin's bias tables and patch
    merging ignored so that Swin really gets pruned), timed end to end like fxprune (a deep copy included)."""
    if not peer.available():
        return None
    started = time.perf_counter()
    try:
        peer.prune_at_ratio(model, torch.randn(1, 3, 224, 224), 0.5, None, keep_output_width=False)
    except Exception as exc:  # noqa: BLE001 - report, do not hide
        print(f"  torch-pruning failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(2)
    fxprune_cost(timm.create_model("vit_tiny_patch16_224", depth=1).eval())  # warm-up (imports, kernels)
    rows = []
    for label, (name, kwargs) in MODELS.items():
        if args.only and label not in args.only:
            continue
        model = timm.create_model(name, **kwargs).eval()
        unchecked, _ = fxprune_cost(model, verify=False)
        seconds, memory = fxprune_cost(model)
        peer = None if args.no_peer else torch_pruning_cost(timm.create_model(name, **kwargs).eval())
        row = {"model": label, "timm": name, "args": kwargs, "params_m": fxprune.count_params(model) / 1e6,
               "fxprune_s": seconds, "fxprune_unchecked_s": unchecked, "fxprune_rss_growth_mb": memory,
               "torch_pruning_s": peer}
        rows.append(row)
        print(f"{label:16s} fxprune {seconds:6.2f}s (+{memory:6.0f} MB; {unchecked:6.2f}s without the self-check)   "
              "torch-pruning "
              f"{'-' if peer is None else f'{peer:6.2f}s'}", flush=True)
        del model
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "cost.json").write_text(json.dumps(rows, indent=1))
    if args.markdown:
        print("\n| model | params (M) | fxprune (s) | of which self-check | new peak RSS (MB) | Torch-Pruning (s) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            peer = "-" if r["torch_pruning_s"] is None else f"{r['torch_pruning_s']:.2f}"
            check = max(0.0, r["fxprune_s"] - r["fxprune_unchecked_s"]) / r["fxprune_s"]
            print(f"| {r['model']} | {r['params_m']:.1f} | {r['fxprune_s']:.2f} | {100 * check:.0f}% | "
                  f"{r['fxprune_rss_growth_mb']:.0f} | {peer} |")


if __name__ == "__main__":
    main()
