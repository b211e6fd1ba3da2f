"""Coverage of timm's transformer families: prune at 0.25, check masked equivalence and the MACs cut.

    python benchmarks/zoo.py                 # prints a table, writes benchmarks/results/zoo.json
    python benchmarks/zoo.py --markdown      # the README's coverage table

A family counts as supported when pruning at ratio 0.25 (and half the heads where whole heads may go)
shrinks attention (q/k, v or heads), is masked-equivalent on fresh inputs at batch sizes 2 and 3 (the trace
used 1; relative error < 1e-4 on random unit-scale weights) and reduces MACs; otherwise the row says why
(the frozen reason of the attention groups from fxprune.analyze, or the error).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import timm
import torch

import fxprune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import randomize  # noqa: E402

FAMILIES = {  # family -> (timm name, constructor arguments keeping it small); tests/test_zoo.py asserts these
    "ViT": ("vit_small_patch16_224", {}),
    "DeiT": ("deit_tiny_patch16_224", {}),
    "DeiT3": ("deit3_small_patch16_224", {}),
    "BEiT": ("beit_base_patch16_224", {"depth": 2}),
    "EVA-02": ("eva02_tiny_patch14_224", {"depth": 2}),
    "PVT-v2": ("pvt_v2_b0", {}),
    "Twins": ("twins_pcpvt_small", {"depths": (1, 1, 1, 1)}),
    "Swin": ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}),
    "Swin-v2": ("swinv2_tiny_window8_256", {"depths": (1, 1, 1, 1)}),
    "LeViT": ("levit_128s", {}),
    "CrossViT": ("crossvit_tiny_240", {}),
    "TinyViT": ("tiny_vit_5m_224", {}),
    "EfficientFormer": ("efficientformer_l1", {}),
    "FLatten-DeiT": ("flatten_deit_tiny_patch16_224", {"depth": 2}),
    "FLatten-Swin": ("flatten_swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1)}),
}
MORE_FAMILIES = {  # the rest of timm's families with attention (one per timm.models module), run by the benchmark
    "FastViT": ("fastvit_sa12", {"layers": (1, 1, 1, 1)}),  # the t/s variants have no attention
    "CoaT": ("coat_lite_tiny", {}),
    "MaxViT": ("maxvit_tiny_tf_224", {"depths": (1, 1, 1, 1)}),
    "MViT-v2": ("mvitv2_tiny", {}),
    "XCiT": ("xcit_nano_12_p16_224", {"depth": 2}),
    "CaiT": ("cait_xxs24_224", {"depth": 2}),
    "Hiera": ("hiera_tiny_224", {}),
    "MobileViT": ("mobilevit_xxs", {}),
    "MobileViT-v2": ("mobilevitv2_050", {}),
    "ConViT": ("convit_tiny", {"depth": 2}),
    "VOLO": ("volo_d1_224", {}),
    "NesT": ("nest_tiny", {}),
    "GCViT": ("gcvit_xxtiny", {}),
    "DaViT": ("davit_tiny", {"depths": (1, 1, 1, 1)}),
    "EdgeNeXt": ("edgenext_xx_small", {}),
    "PiT": ("pit_ti_224", {}),
    "TNT": ("tnt_s_patch16_224", {"depth": 2}),
    "ViT-hybrid": ("vit_tiny_r_s16_p8_224", {"depth": 2}),
    "ViT-relpos": ("vit_relpos_small_patch16_224", {"depth": 2}),
    "SAM-ViT": ("samvit_base_patch16_224", {"depth": 2}),
    "EfficientViT-MIT": ("efficientvit_b0", {}),
    "EfficientViT-MSRA": ("efficientvit_m0", {}),
    "EfficientFormer-v2": ("efficientformerv2_s0", {}),
    "Swin-v2-CR": ("swinv2_cr_tiny_224", {"depths": (1, 1, 1, 1)}),
    "CoAtNet": ("coatnet_0_224", {"depths": (1, 1, 1, 1)}),
    "CAFormer": ("caformer_s18", {}),  # caformer_s18 fixes depths itself
    "NextViT": ("nextvit_small", {}),
    "Visformer": ("visformer_tiny", {}),
    "BoTNet": ("botnet26t_256", {}),
    "HaloNet": ("halonet26t", {}),
    "LambdaNet": ("lambda_resnet26t", {}),
    "SwiftFormer": ("swiftformer_xs", {}),
    "SHViT": ("shvit_s1", {}),
    "ViTamin": ("vitamin_small_224", {"depth": 2}),
    "Hiera-SAM2": ("sam2_hiera_tiny", {}),
    "NaFlexViT": ("naflexvit_base_patch16_gap", {"depth": 2}),
    "MobileNetV5": ("mobilenetv5_300m", {}),
    "LowFormer": ("lowformer_b0", {}),
    "CPUBone": ("cpubone_b0_bfrobust", {}),
    "iFormer": ("iformer_t", {}),
    "DeepSeek-ViT": ("deepseek_vit_412m", {"depth": 2}),
    "Qwen3-ViT": ("qwen3_vit_88m", {"depth": 2}),
    "Gemma4-ViT": ("gemma4_vit_167m", {"depth": 2}),
    "CSATv2": ("csatv2", {}),
    "EfficientViM": ("efficientvim_m1", {}),
}
ALL_FAMILIES = {**FAMILIES, **MORE_FAMILIES}
ATTENTION_KINDS = ("qk", "v", "heads")
BATCHES = (2, 3)  # fresh inputs at batch sizes other than the trace's (1)


def _inputs_like(example: tuple, batch: int, generator: torch.Generator) -> tuple:
    return tuple(torch.randn(batch, *x.shape[1:], generator=generator) if isinstance(x, torch.Tensor) else x
                 for x in example)


def _frozen_reason(analysis, kind: str) -> str:
    """The first frozen reason of a group of ``kind`` (why attention of that kind cannot shrink)."""
    for group in analysis.groups:
        if group.kind == kind and not group.prunable and group.frozen:
            return group.frozen[0]
    return ""


def pruned_kinds(analysis, plan) -> set[str]:
    """The kinds of the groups the plan removed channels (or heads) from."""
    return {analysis.group(g).kind for g, rows in plan.removed.items() if any(rows)}


def kind_columns(analysis, plan) -> dict[str, str]:
    """For q/k, v, heads and mlp: pruned, prunable (not cut), frozen (with the first reason) or none found."""
    shrunk = pruned_kinds(analysis, plan)
    prunable = {g.kind for g in analysis.groups if g.prunable}
    present = {g.kind for g in analysis.groups}
    cols = {}
    for kind in (*ATTENTION_KINDS, "mlp"):
        if kind in shrunk:
            cols[kind] = "pruned"
        elif kind in prunable:
            cols[kind] = "prunable, not cut"
        elif kind in present:
            cols[kind] = "frozen: " + _frozen_reason(analysis, kind)
        else:
            cols[kind] = "none found"
    return cols


def short_cell(column: str) -> str:
    """A kind column as a markdown cell: yes, prunable, frozen or -."""
    short = {"pruned": "yes", "prunable, not cut": "prunable", "none found": "-"}
    return short.get(column, "frozen" if column.startswith("frozen") else column)


def prune_or_channels_only(analysis, ratio: float, head_ratio: float):
    """(plan, pruned, head_ratio, why heads were refused, what fxprune warned): the plan at ``ratio`` and
    ``head_ratio`` applied, or where the self-check refuses the result with heads removed, the plan at
    ``ratio`` alone. A shortfall warning goes into the row's reason: it shows the user was told."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fxprune.PruningShortfallWarning)
        plan = fxprune.plan(analysis, ratio, head_ratio=head_ratio)
        try:
            pruned, refused = fxprune.apply(analysis, plan), ""
        except fxprune.RewriteError as exc:  # the self-check refused the result: try channels only
            if not head_ratio:
                raise
            refused = f"head removal refused by the self-check ({str(exc).splitlines()[0][:160]})"
            caught.clear()
            plan, head_ratio = fxprune.plan(analysis, ratio), 0.0
            pruned = fxprune.apply(analysis, plan)
    warned = [". ".join(str(w.message).split(". ")[:2]) for w in caught if issubclass(w.category, fxprune.PruningShortfallWarning)]
    return plan, pruned, head_ratio, refused, "; ".join(dict.fromkeys(warned))


def check(name: str, kwargs: dict) -> dict:
    row = {"model": name, "args": kwargs}
    try:
        model = randomize(timm.create_model(name, **kwargs)).eval()
    except Exception as exc:  # noqa: BLE001 - a report of what timm itself does
        return {**row, "status": "unsupported", "reason": f"timm cannot build it: {exc}".splitlines()[0][:300]}
    started = time.perf_counter()
    try:
        analysis = fxprune.analyze(model)
        kinds = {g.kind for g in analysis.groups if g.prunable}
        plan, pruned, head_ratio, refused, warned = prune_or_channels_only(analysis, 0.25,
                                                                           0.5 if "heads" in kinds else 0.0)
    except fxprune.FxpruneError as exc:
        return {**row, "status": "unsupported", "reason": str(exc).splitlines()[0][:300]}
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": "unsupported", "reason": f"fxprune bug: {type(exc).__name__}: {exc}".splitlines()[0][:300],
                "trace": traceback.format_exc()[-1500:]}
    seconds = time.perf_counter() - started
    inputs = analysis.captured.example_inputs
    generator = torch.Generator().manual_seed(1)
    # export graphs lift tensor constants the model does not hold by that name: mask the captured graph
    exported = analysis.gm.meta.get(fxprune.meta.CAPTURE_METHOD) == "torch.export"
    reference = fxprune.mask(analysis if exported else model, plan, example_inputs=inputs)
    errors = {}
    try:
        with torch.no_grad():
            for batch in BATCHES:
                x = _inputs_like(inputs, batch, generator)
                which = "pruned module"
                out = pruned(*x)
                which = "masked reference"
                errors[batch] = fxprune.relative_error(out, reference(*x))
    except Exception as exc:  # noqa: BLE001 - the pruned module must accept other batch sizes
        return {**row, "status": "unsupported", "reason": f"{which} fails at batch {batch}: "
                f"{type(exc).__name__}: {exc}".splitlines()[0][:300], "seconds": seconds}
    error = max(errors.values())
    macs = fxprune.count_macs(pruned, inputs) / fxprune.count_macs(model, inputs)
    shrunk = pruned_kinds(analysis, plan)
    present = {g.kind for g in analysis.groups}
    cols = kind_columns(analysis, plan)
    attention = any(k in shrunk for k in ATTENTION_KINDS)
    equivalent = error < 1e-4
    ok = equivalent and macs < 1.0 and attention
    if ok:
        reason = ""
    elif not equivalent:
        reason = f"not masked-equivalent (error {error:.1e})"
    elif not attention:
        frozen = [f"{k}: {cols[k]}" for k in ATTENTION_KINDS if cols[k].startswith("frozen")]
        reason = "attention not pruned: " + ("; ".join(frozen) if frozen else
                                             "no attention found in the graph (no q·kᵀ reached the analysis)")
    else:
        reason = "nothing prunable"
    if refused or warned:
        reason = "; ".join(r for r in (reason, refused, f"warned: {warned}" if warned else "") if r)
    if not ok and analysis.unknown_ops:
        reason += f"; ops without rules: {', '.join(sorted({op.target for op in analysis.unknown_ops if op.touched_channels})[:3])}"
    return {**row, "status": "supported" if ok else "unsupported", "reason": reason, "error": error,
            "errors": errors, "batches": list(BATCHES), "macs_kept": macs, "pruned_kinds": sorted(shrunk),
            "frozen_kinds": sorted(k for k in present - kinds if k != "other"), "head_ratio": head_ratio,
            "capture": analysis.gm.meta.get(fxprune.meta.CAPTURE_METHOD, "symbolic"), "seconds": seconds,
            "channels_removed": plan.options["coverage"]["reached"], **cols}


def family_args(doc: str) -> argparse.Namespace:
    """The command line of a benchmark over families (--markdown, --only NAME ...); seeds torch and keeps it to
    the two threads the other benchmarks use."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--only", nargs="*", help="family names to run")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    return args


def save_rows(rows: list[dict], name: str, args: argparse.Namespace) -> None:
    """benchmarks/results/<name>.json, where every family ran (not with --only)."""
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    if not args.only:
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1, default=str))


def main() -> None:
    args = family_args(__doc__)
    rows = []
    for family, (name, kwargs) in ALL_FAMILIES.items():
        if args.only and family not in args.only:
            continue
        row = {"family": family, **check(name, kwargs)}
        rows.append(row)
        print(f"{family:18s} {row['status']:11s} {row.get('macs_kept', float('nan')):6.3f} "
              f"{row.get('error', float('nan')):9.2e} {row.get('seconds', float('nan')):6.1f}s  "
              f"{','.join(row.get('pruned_kinds', []))}  {row.get('reason', '')[:200]}", flush=True)
    save_rows(rows, "zoo", args)
    if args.markdown:
        print(f"\n| family | timm model (args) | status | qk | v | heads | mlp | channels removed (0.25 asked) | "
              f"MACs kept | masked error (batch {', '.join(map(str, BATCHES))}) | prune s | reason |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            cells = [short_cell(r.get(k, "")) for k in (*ATTENTION_KINDS, "mlp")]
            print(f"| {r['family']} | `{r['model']}` {r['args'] or ''} | {r['status']} | {' | '.join(cells)} | "
                  f"{r.get('channels_removed', float('nan')):.3f} | {r.get('macs_kept', float('nan')):.3f} | {r.get('error', float('nan')):.1e} | "
                  f"{r.get('seconds', float('nan')):.1f} | {r.get('reason', '')[:240]} |")


if __name__ == "__main__":
    main()
