"""Coverage of timm's transformer families: prune at 0.25, check masked equivalence and the MACs cut.

    python benchmarks/zoo.py                 # prints a table, writes benchmarks/results/zoo.json
    python benchmarks/zoo.py --markdown      # the README's coverage table

A model counts as supported when pruning at ratio 0.25 is masked-equivalent (relative error < 1e-4 on
random unit-scale weights) and reduces MACs; otherwise the row gives the exact reason.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import timm
import torch

import fxprune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import randomize  # noqa: E402

FAMILIES = {  # family -> (timm name, constructor arguments keeping it small)
    "ViT": ("vit_small_patch16_224", {}),
    "DeiT": ("deit_tiny_patch16_224", {}),
    "DeiT3": ("deit3_small_patch16_224", {}),
    "BEiT": ("beit_base_patch16_224", {"depth": 2}),
    "CaiT": ("cait_xxs24_224", {"depth": 2}),
    "EVA-02": ("eva02_tiny_patch14_224", {"depth": 2}),
    "PVT-v2": ("pvt_v2_b0", {}),
    "Twins": ("twins_pcpvt_small", {"depths": (1, 1, 1, 1)}),
    "XCiT": ("xcit_nano_12_p16_224", {"depth": 2}),
    "Swin": ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}),
    "Swin-v2": ("swinv2_tiny_window8_256", {"depths": (1, 1, 1, 1)}),
    "LeViT": ("levit_128s", {}),
    "MViT-v2": ("mvitv2_tiny", {}),
    "CrossViT": ("crossvit_tiny_240", {}),
    "TinyViT": ("tiny_vit_5m_224", {}),
    "MaxViT": ("maxvit_tiny_tf_224", {"depths": (1, 1, 1, 1)}),
    "CoaT": ("coat_lite_tiny", {}),
    "EfficientFormer": ("efficientformer_l1", {}),
    "FastViT": ("fastvit_t8", {}),
    "FLatten-DeiT": ("flatten_deit_tiny_patch16_224", {"depth": 2}),
    "FLatten-Swin": ("flatten_swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}),
}


def check(name: str, kwargs: dict) -> dict:
    row = {"model": name, "args": kwargs}
    try:
        model = randomize(timm.create_model(name, **kwargs)).eval()
    except Exception as exc:  # noqa: BLE001 - a report of what timm itself does
        return {**row, "status": "unsupported", "reason": f"timm cannot build it: {exc}".splitlines()[0]}
    started = time.perf_counter()
    try:
        analysis = fxprune.analyze(model)
        plan = fxprune.plan(analysis, 0.25)
        pruned = fxprune.apply(analysis, plan)
    except fxprune.FxpruneError as exc:
        return {**row, "status": "unsupported", "reason": str(exc).splitlines()[0][:300]}
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": "unsupported", "reason": f"fxprune bug: {type(exc).__name__}: {exc}".splitlines()[0][:300],
                "trace": traceback.format_exc()[-1500:]}
    seconds = time.perf_counter() - started
    inputs = analysis.captured.example_inputs
    reference = fxprune.mask(model, plan, example_inputs=inputs)
    with torch.no_grad():
        error = fxprune.relative_error(pruned(*inputs), reference(*inputs))
    macs = fxprune.count_macs(pruned, inputs) / fxprune.count_macs(model, inputs)
    kinds = sorted({analysis.group(g).kind for g in plan.removed})
    frozen_kinds = sorted({g.kind for g in analysis.groups if not g.prunable and g.kind != "other"})
    ok = error < 1e-4 and macs < 1.0
    reason = "" if ok else ("not masked-equivalent" if error >= 1e-4 else "nothing prunable")
    if not ok and analysis.unknown_ops:
        reason += f"; ops without rules: {', '.join(sorted({op.target for op in analysis.unknown_ops if op.touched_channels})[:3])}"
    return {**row, "status": "supported" if ok else "unsupported", "reason": reason, "error": error,
            "macs_kept": macs, "pruned_kinds": kinds, "frozen_kinds": frozen_kinds, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--only", nargs="*", help="family names to run")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for family, (name, kwargs) in FAMILIES.items():
        if args.only and family not in args.only:
            continue
        row = {"family": family, **check(name, kwargs)}
        rows.append(row)
        print(f"{family:16s} {row['status']:11s} {row.get('macs_kept', float('nan')):6.3f} "
              f"{row.get('error', float('nan')):9.2e}  {','.join(row.get('pruned_kinds', []))}  {row.get('reason', '')}",
              flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "zoo.json").write_text(json.dumps(rows, indent=1, default=str))
    if args.markdown:
        print("\n| family | timm model (args) | status | MACs kept at 0.25 | masked error | pruned | reason |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['family']} | `{r['model']}` {r['args'] or ''} | {r['status']} | "
                  f"{r.get('macs_kept', float('nan')):.3f} | {r.get('error', float('nan')):.1e} | "
                  f"{', '.join(r.get('pruned_kinds', []))} | {r.get('reason', '')} |")


if __name__ == "__main__":
    main()
