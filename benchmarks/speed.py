"""Real speedup on this CPU against the MACs cut, for fxprune and Torch-Pruning at equal MACs.

For each model: the original, fxprune's graph with nothing removed (the cost of the graph itself), fxprune (q/k,
v, heads and MLP channels; "+residual": the residual width too, unless ``--no-residual``; "+depth": whole
residual branches too, scored on the example input, unless ``--no-depth``) and Torch-Pruning's recipe (benchmarks/peer.py) at the same MACs target, each at ``round_to`` 1 (widths as
they fall) and 8 (kept widths rounded to multiples of 8: fxprune's ``round_to``, MetaPruner's ``round_to``).
Every variant's name and JSON row say its ``round_to``. Latency is the median of interleaved runs (every
variant runs once per round, so drift hits all alike) at 2 threads, batch 1 / 8 / 32, eager and
``torch.compile``.
Reported: speedup = latency_before / latency_after and efficiency = speedup / (MACs_before / MACs_after);
1.0 means the wall clock falls as fast as the MACs.

    python benchmarks/speed.py                      # table + benchmarks/results/speed.json
    python benchmarks/speed.py --no-compile --batches 1 8 --markdown

Weights are random (latency does not depend on them); shapes are those of the pretrained models.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch

import fxprune
import peer
from fxprune.allocate import DEFAULT_KINDS

RESULTS = Path(__file__).parent / "results"
ROUND_TO = (1, 8)
# torch.compile is slow to build on 2 cores: it runs the original, fxprune at round_to 8 and Torch-Pruning only
COMPILED = lambda variant: variant == "original" or variant.endswith("round_to 8") or variant.startswith("torch-pruning")  # noqa: E731
MODELS = {"DeiT-S": ("deit_small_patch16_224", 224), "Swin-T": ("swin_tiny_patch4_window7_224", 224)}


def variant_name(method: str, target: float, round_to: int) -> str:
    return f"{method} {target:.0%} MACs, round_to {round_to}"


def interleaved_latency(models: dict[str, torch.nn.Module], x: torch.Tensor | tuple, rounds: int,
                        warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per forward for every model, measured round-robin; ``x`` is the input, or a tuple
    of positional inputs."""
    inputs = x if isinstance(x, tuple) else (x,)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for name, model in models.items():
                started = time.perf_counter()
                model(*inputs)
                if r >= warmup:
                    times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def variants(model: torch.nn.Module, example: torch.Tensor, target: float, log,
             residual: bool = True, depth: bool = True) -> tuple[dict, dict, dict, dict]:
    """(models, MACs, notes on Torch-Pruning's runs, round_to) by variant name. With ``residual``, fxprune also
    prunes the residual width (``kinds`` with "residual"), as Torch-Pruning's recipe does; with ``depth``, a
    variant removes whole residual branches besides channels (``kinds`` with "depth")."""
    analysis = fxprune.analyze(model, (example,))
    out = {"original": model,
           "fxprune graph, nothing removed": fxprune.apply(analysis, fxprune.plan(analysis, 0.0))}
    round_tos: dict[str, int | None] = dict.fromkeys(out)
    kind_sets = {"fxprune": DEFAULT_KINDS, **({"fxprune +residual": (*DEFAULT_KINDS, "residual")} if residual else {}),
                 **({"fxprune +depth": (*DEFAULT_KINDS, "depth")} if depth else {})}
    for method, kinds in kind_sets.items():
        for round_to in ROUND_TO:
            plan = fxprune.plan(analysis, target_macs=target, round_to=round_to, kinds=kinds)
            name = variant_name(method, target, round_to)
            out[name], round_tos[name] = fxprune.apply(analysis, plan), round_to
            if "depth" in kinds:
                log(f"    {name}: {len(plan.branches)} residual branches removed whole")
    notes = {}
    for round_to in ROUND_TO if peer.available() else ():
        name = variant_name("torch-pruning", target, round_to)
        pruned, _, notes[name] = peer.prune_to_macs(model, example, target, None, log=log, round_to=round_to)
        if pruned is not None:
            out[name], round_tos[name] = pruned, round_to
    macs = {name: fxprune.count_macs(m, (example,)) for name, m in out.items()}
    return out, macs, notes, round_tos


def compiled(models: dict[str, torch.nn.Module], x: torch.Tensor, log) -> dict[str, torch.nn.Module]:
    # timm models share one forward, which dynamo recompiles for every model and batch size; past its
    # recompile limit (8) it silently runs eager, so each batch size starts from a clean cache
    torch._dynamo.reset()
    out = {}
    for name, model in models.items():
        started = time.perf_counter()
        fn = torch.compile(model, dynamic=False)
        with torch.inference_mode():
            fn(x)
        out[name] = fn
        log(f"    compiled {name} in {time.perf_counter() - started:.0f}s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--target", type=float, default=0.5, help="MACs kept (fraction)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-residual", action="store_true", help="without the fxprune rows that prune residual width")
    parser.add_argument("--no-depth", action="store_true", help="without the fxprune rows that remove whole branches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", default=str(RESULTS / "speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, flush=True)  # noqa: E731
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    rows, started = [], time.perf_counter()
    for label in args.models:
        name, size = MODELS[label]
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        example = torch.randn(1, 3, size, size)
        models, macs, notes, round_tos = variants(model, example, args.target, log, residual=not args.no_residual,
                                                 depth=not args.no_depth)
        for note in notes.items():
            log(f"  {label}: {note[0]} {note[1]}")
        for batch in args.batches:
            x = torch.randn(batch, 3, size, size)
            rounds = max(3, args.rounds if batch < 32 else args.rounds // 2)
            for mode in modes:
                chosen = {k: v for k, v in models.items() if mode == "eager" or COMPILED(k)}
                runnable = chosen if mode == "eager" else compiled(chosen, x, log)
                ms = interleaved_latency(runnable, x, rounds)
                for variant, value in ms.items():
                    speedup = ms["original"] / value
                    macs_ratio = macs["original"] / macs[variant]
                    rows.append({"model": label, "variant": variant, "round_to": round_tos[variant],
                                 "batch": batch, "mode": mode, "ms": value,
                                 "macs_g": macs[variant] / 1e9, "params_m": fxprune.count_params(models[variant]) / 1e6,
                                 "speedup": speedup, "macs_ratio": macs_ratio, "efficiency": speedup / macs_ratio})
                    log(f"  {label} b{batch} {mode:7s} {variant:40s} {value:8.1f} ms  speedup {speedup:.2f}x  "
                        f"MACs ratio {macs_ratio:.2f}  efficiency {speedup / macs_ratio:.2f}")
    Path(args.json).parent.mkdir(exist_ok=True)
    Path(args.json).write_text(json.dumps({"threads": args.threads, "target": args.target, "rows": rows,
                                           "seconds": time.perf_counter() - started}, indent=1))
    if args.markdown:
        print("\n| model | variant | MACs (G) | " + " | ".join(f"b{b} {m} ms (speedup, eff.)" for m in modes
                                                          for b in args.batches) + " |")
        print("|---|---|---|" + "---|" * (len(modes) * len(args.batches)))
        for label in args.models:
            for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == label):
                cells = []
                for mode in modes:
                    for b in args.batches:
                        r = next((r for r in rows if (r["model"], r["variant"], r["batch"], r["mode"]) ==
                                  (label, variant, b, mode)), None)
                        cells.append("-" if r is None else f"{r['ms']:.0f} ({r['speedup']:.2f}x, {r['efficiency']:.2f})")
                macs_g = next(r["macs_g"] for r in rows if (r["model"], r["variant"]) == (label, variant))
                print(f"| {label} | {variant} | {macs_g:.2f} | " + " | ".join(cells) + " |")
    log(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
