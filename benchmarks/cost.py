"""Pruning cost: wall time and peak memory of capture + analysis + rewrite + self-check, against Torch-Pruning's
time for the same job (head-dim and MLP channel pruning at ratio 0.5, magnitude importance). The self-check's
share is its own wall time (``fxprune.check_of(pruned).seconds``) over the time of the same call.

    python benchmarks/cost.py                       # table + benchmarks/results/cost.json
    python benchmarks/cost.py --markdown --no-peer  # without Torch-Pruning (pip install torch-pruning)
    python benchmarks/cost.py --only ViT-S ViT-B --repeats 5
    python benchmarks/cost.py --markdown --threads 1  # on a machine other jobs keep busy

Timings are wall clock on this machine, after a warm-up: each cell is the fastest of ``--repeats`` runs (on
a shared machine the least disturbed one; a median still swung by 2x with other jobs running), fxprune's and
Torch-Pruning's alike. The self-check's share is its fastest time over its fastest time plus the fastest time
of the rest of the call, both timed inside the calls, so load that comes and goes between (or within) calls
never enters it as a difference of two runs. Compare within one run only. Memory is
how far the first call raised the process's peak resident set (ru_maxrss; 0 when it stayed below an earlier
peak), so it is rough. The phase columns are the same steps called one by one (``phase_seconds``), the
fastest of the repeats each: where the time goes.
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


def fxprune_call(model: torch.nn.Module) -> tuple[float, float, float]:
    """One ``fxprune.prune`` call: (seconds, of which the self-check's seconds, peak RSS growth in MB)."""
    gc.collect()
    before = _rss_mb()
    started = time.perf_counter()
    pruned = fxprune.prune(model, 0.5)
    return time.perf_counter() - started, fxprune.check_of(pruned).seconds, max(0.0, _rss_mb() - before)


def fxprune_cost(model: torch.nn.Module, repeats: int) -> dict:
    """The fastest of ``repeats`` calls, and the self-check's share from the fastest check and the fastest rest
    of a call (every call kept in the JSON); memory from the first call."""
    calls = [fxprune_call(model) for _ in range(repeats)]
    check, rest = min(c[1] for c in calls), min(c[0] - c[1] for c in calls)
    return {"fxprune_s": min(c[0] for c in calls), "fxprune_check_s": check, "fxprune_rest_s": rest,
            "fxprune_check_share": check / (check + rest),
            "fxprune_calls_s": [c[0] for c in calls], "fxprune_checks_s": [c[1] for c in calls],
            "fxprune_rss_growth_mb": calls[0][2]}


PHASES = ("capture", "analyze", "plan", "rewrite", "self-check")


def phase_seconds(model: torch.nn.Module, repeats: int) -> dict[str, float]:
    """Where the time of a ``prune(model, 0.5)`` call goes: the same steps called one by one (capture, channel
    analysis, importance and allocation, the rewrite passes, the self-check), the fastest of ``repeats`` each."""
    from fxprune.analysis import analyze_captured
    from fxprune.capture import capture
    from fxprune.check import check_pruned

    best = dict.fromkeys(PHASES, float("inf"))
    for _ in range(repeats):
        state: dict = {}
        steps = {
            "capture": lambda: state.update(captured=capture(model)),
            "analyze": lambda: state.update(analysis=analyze_captured(state["captured"])),
            "plan": lambda: state.update(plan=fxprune.plan(state["analysis"], 0.5)),
            "rewrite": lambda: state.update(pruned=fxprune.apply(state["analysis"], state["plan"], verify=False)),
            "self-check": lambda: check_pruned(state["analysis"], state["plan"].removed_atoms(state["analysis"]),
                                               state["pruned"]),
        }
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def torch_pruning_cost(model: torch.nn.Module, repeats: int) -> float | None:
    """Torch-Pruning's ViT recipe (benchmarks/peer.py: head dims and MLP channels, Swin's bias tables and patch
    merging ignored so that Swin really gets pruned), timed end to end like fxprune (a deep copy included);
    the fastest of ``repeats`` runs, as for fxprune."""
    if not peer.available():
        return None
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        try:
            peer.prune_at_ratio(model, torch.randn(1, 3, 224, 224), 0.5, None, keep_output_width=False)
        except Exception as exc:  # noqa: BLE001 - report, do not hide
            print(f"  torch-pruning failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            return None
        seconds.append(time.perf_counter() - started)
    return min(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--repeats", type=int, default=3, help="runs per model and tool (the fastest is reported)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; 1 on a busy machine, where two threads stall on each other")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fxprune_call(timm.create_model("vit_tiny_patch16_224", depth=1).eval())  # warm-up (imports, kernels)
    rows = []
    for label, (name, kwargs) in MODELS.items():
        if args.only and label not in args.only:
            continue
        model = timm.create_model(name, **kwargs).eval()
        cost = fxprune_cost(model, args.repeats)
        cost["phases_s"] = phase_seconds(model, args.repeats)
        peer = None if args.no_peer else torch_pruning_cost(timm.create_model(name, **kwargs).eval(), args.repeats)
        row = {"model": label, "timm": name, "args": kwargs, "params_m": fxprune.count_params(model) / 1e6,
               **cost, "torch_pruning_s": peer}
        rows.append(row)
        print(f"{label:16s} fxprune {cost['fxprune_s']:6.2f}s (+{cost['fxprune_rss_growth_mb']:6.0f} MB; self-check "
              f"{cost['fxprune_check_s']:5.2f}s, {100 * cost['fxprune_check_share']:.0f}%)   torch-pruning "
              f"{'-' if peer is None else f'{peer:6.2f}s'}", flush=True)
        print("                 phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in cost["phases_s"].items()), flush=True)
        del model
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    summary = {"threads": args.threads, "repeats": args.repeats, "rows": rows}
    (out / "cost.json").write_text(json.dumps(summary, indent=1))
    if args.markdown:
        print("\n| model | params (M) | fxprune (s) | of which self-check | new peak RSS (MB) | Torch-Pruning (s) | "
              + " | ".join(f"{p} (s)" for p in PHASES) + " |")
        print("|---|---|---|---|---|---|" + "---|" * len(PHASES))
        for r in rows:
            peer = "-" if r["torch_pruning_s"] is None else f"{r['torch_pruning_s']:.2f}"
            check = r["fxprune_check_share"]
            print(f"| {r['model']} | {r['params_m']:.1f} | {r['fxprune_s']:.2f} | {100 * check:.0f}% | "
                  f"{r['fxprune_rss_growth_mb']:.0f} | {peer} | "
                  + " | ".join(f"{r['phases_s'][p]:.2f}" for p in PHASES) + " |")


if __name__ == "__main__":
    main()
