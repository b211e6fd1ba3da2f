"""Real speedup on a CUDA GPU at equal MACs: fxprune (channels, and channels + depth) and Torch-Pruning.

For DeiT-S and Swin-T at 224 (random weights: latency does not depend on them): the original, fxprune at a
MACs target with ``round_to`` 8 (channels: q/k, v, MLP), fxprune with whole residual branches as well
(``kinds`` with "depth"), and Torch-Pruning's recipe (benchmarks/peer.py, ``round_to`` 8) bisected to the same
MACs where torch-pruning is installed. Latency: CUDA events, median of interleaved rounds (every variant once
per round), in bfloat16 autocast and float32, eager. Pruning itself runs on the CPU, then the models move.

    python benchmarks/gpu_speed.py --markdown        # needs a CUDA device; writes benchmarks/results/gpu_speed.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
import fxprune  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = {"DeiT-S": "deit_small_patch16_224", "Swin-T": "swin_tiny_patch4_window7_224"}


def variants(name: str, target: float, log) -> dict:
    model = timm.create_model(MODELS[name], pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    full = fxprune.count_macs(model, (x,))
    out = {"original": (model, 1.0)}
    for label, kinds in (("fxprune channels", ("qk", "v", "mlp")), ("fxprune channels + depth", ("depth", "qk", "v", "mlp"))):
        pruned = fxprune.prune(model, target_macs=target, example_inputs=(x,), kinds=kinds, round_to=8)
        out[label] = (pruned, fxprune.count_macs(pruned, (x,)) / full)
        log(f"  {name} {label}: MACs {out[label][1]:.3f}, branches {fxprune.plan_of(pruned).branches}")
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        import peer

        pruned, _, note = peer.prune_to_macs(model, x, target, None, False, log=log, round_to=8)
        if pruned is not None:
            out["torch-pruning"] = (pruned, fxprune.count_macs(pruned, (x,)) / full)
    except ImportError as error:
        log(f"  torch-pruning unavailable: {error}")
    return out


def latency(models: dict, batch: int, dtype, rounds: int) -> dict:
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    times = {k: [] for k in models}
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        for model in models.values():
            for _ in range(3):
                model(x)
        torch.cuda.synchronize()
        for _ in range(rounds):
            for key, model in models.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(5):
                    model(x)
                end.record()
                torch.cuda.synchronize()
                times[key].append(start.elapsed_time(end) / 5)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64, 256])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", default=str(RESULTS / "gpu_speed.json"))
    args = parser.parse_args()
    log = lambda m: print(m, flush=True)  # noqa: E731
    rows = []
    for name in args.models:
        found = variants(name, args.target, log)
        models = {k: m.cuda() for k, (m, _) in found.items()}
        for dtype in (torch.bfloat16, torch.float32):
            for batch in args.batches:
                ms = latency(models, batch, dtype, args.rounds)
                for key, (_, macs) in found.items():
                    rows.append({"model": name, "variant": key, "macs": macs, "dtype": str(dtype).removeprefix("torch."),
                                 "batch": batch, "ms": ms[key], "speedup": ms["original"] / ms[key]})
                log(f"{name} {dtype} b{batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()))
    Path(args.json).parent.mkdir(exist_ok=True)
    Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                           "rows": rows}, indent=1))
    if args.markdown:
        print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
        print("| model | variant | MACs kept | dtype | batch | ms | speedup |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['variant']} | {r['macs']:.1%} | {r['dtype']} | {r['batch']} | {r['ms']:.2f} | "
                  f"{r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
