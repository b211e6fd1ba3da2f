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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224", help="timm model name")
    parser.add_argument("--checkpoint", help="a state_dict (.pth / .safetensors) to load into the model")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
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
        model.load_state_dict(_load_state_dict(args.checkpoint))
    size = model.pretrained_cfg["input_size"]
    inputs = {b: torch.randn(b, *size) for b in args.batches}

    started = time.perf_counter()
    analysis = fxprune.analyze(model)
    analysis_s = time.perf_counter() - started
    prunable = [g for g in analysis.groups if g.prunable]
    print(f"{args.model}: {len(analysis.groups)} groups, {len(prunable)} prunable, analysis {analysis_s:.2f}s")

    rows = [_measure("original", model, model, inputs, args.repeats, None)]
    for ratio in args.ratios:
        started = time.perf_counter()
        plan = fxprune.plan(analysis, ratio, importance=args.importance)
        pruned = fxprune.apply(analysis, plan)
        prune_s = time.perf_counter() - started
        masked = fxprune.mask(model, plan)
        rows.append(_measure(f"ratio {ratio}", pruned, masked, inputs, args.repeats, prune_s))

    base = rows[0]
    header = ["model", "params (M)", "MACs (G)"] + [f"ms @ b{b}" for b in args.batches] + \
             [f"speedup b{b}" for b in args.batches] + ["masked err", "prune s"]
    table = [header]
    for row in rows:
        table.append([row["name"], f"{row['params'] / 1e6:.2f}", f"{row['macs'] / 1e9:.2f}"]
                     + [f"{row['latency_ms'][b]:.1f}" for b in args.batches]
                     + [f"{base['latency_ms'][b] / row['latency_ms'][b]:.2f}x" for b in args.batches]
                     + [f"{row['masked_error']:.1e}" if row["masked_error"] is not None else "-",
                        f"{row['prune_s']:.2f}" if row["prune_s"] is not None else "-"])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": args.threads, "rows": rows}, f, indent=1)


def _measure(name, model, reference, inputs, repeats, prune_s):
    first = inputs[min(inputs)]
    with torch.no_grad():
        error = None if model is reference else fxprune.relative_error(model(first), reference(first))
    return {
        "name": name,
        "params": fxprune.count_params(model),
        "macs": fxprune.count_macs(model, (first[:1],)),
        "latency_ms": {b: fxprune.latency(model, (x,), repeats=repeats) for b, x in inputs.items()},
        "masked_error": error,
        "prune_s": prune_s,
    }


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


if __name__ == "__main__":
    main()
