"""Hugging Face transformers: what fxprune prunes in each family, eager and sdpa, and whether it is exact.

    python benchmarks/hf.py                 # prints a table, writes benchmarks/results/hf.json
    python benchmarks/hf.py --markdown      # the same table in markdown

Every family of tests/hf_models.py (small configs, random unit-scale weights; no hub access) is traced on one
input (token models: a sequence of 8, encoders with padding), pruned at ratio 0.25 with head_ratio 0.25, and
run on fresh inputs at batch sizes 2 and 3 and (token models) sequence lengths 5 and 12 against the
weight-masked original (fxprune.mask). Where the self-check refuses the head removal, the row is channels
only and says so. The q/k, v, heads and MLP columns are read from the plan and the analysis (as in zoo.py).
"""
from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch

import fxprune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_models import FAMILIES, Arch, build, inputs  # noqa: E402
from zoo import ATTENTION_KINDS, family_args, kind_columns, prune_or_channels_only, save_rows, short_cell  # noqa: E402

ARCH = Arch(heads=8, head_dim=8, layers=2, intermediate=128, kv_groups=2)  # decoders: 4 kv heads, 2 q heads each
RATIO, HEAD_RATIO = 0.25, 0.25
TRACE_SEQ, BATCHES, SEQS = 8, (2, 3), (5, 12)
KIND_COLUMNS = (*ATTENTION_KINDS, "mlp")


def fresh_shapes(kind: str) -> list[tuple[int, int]]:
    """(batch, sequence) pairs other than the trace's; images have no sequence to vary."""
    return [(b, TRACE_SEQ) for b in BATCHES] if kind == "vision" else [(b, s) for b in BATCHES for s in SEQS]


def masked_errors(family, model, plan, pruned, example) -> tuple[dict, str]:
    """Relative error of every output of the pruned model against the masked original, per fresh shape; and
    the first failure where the pruned model (or the reference) does not run at one."""
    reference = fxprune.mask(model, plan, example_inputs=example)
    generator = torch.Generator().manual_seed(1)
    errors = {}
    for batch, seq in fresh_shapes(family.kind):
        x = inputs(family, batch, seq, generator)
        try:
            with torch.no_grad():
                actual, expected = pruned(*x), reference(*x)
        except Exception as exc:  # noqa: BLE001 - the pruned module must accept other shapes
            return errors, f"fails at batch {batch}, length {seq}: {type(exc).__name__}: {exc}".splitlines()[0][:240]
        errors[f"{batch}x{seq}"] = max(fxprune.relative_error(actual[k], expected[k]) for k in actual.keys())
    return errors, ""


def why_not(analysis, cols: dict, refused: str, warned: str = "") -> str:
    """The frozen reasons of the kinds that did not shrink, the head removal the self-check refused, the
    shortfall fxprune warned of, the prunable groups ratio pruning leaves alone (kind "other", e.g. a gated
    MLP), and the ops without a rule that touch channels."""
    parts = [f"{kind}: {cols[kind].removeprefix('frozen: ')}" for kind in KIND_COLUMNS
             if cols[kind].startswith("frozen")]
    parts += [p for p in (refused, warned) if p]
    other = [g.name for g in analysis.groups if g.kind == "other" and g.prunable]
    if other:
        more = ", ..." if other[2:] else ""
        parts.append(f"prunable but of kind other (not cut by ratio): {', '.join(other[:2])}{more}")
    unknown = sorted({str(op.target) for op in analysis.unknown_ops if op.touched_channels})
    if unknown:
        parts.append("ops without rules: " + ", ".join(unknown))
    return "; ".join(parts).replace("function torch._ops.aten.", "")  # aten::to.dtype, not its module path


def check(family, attention: str) -> dict:
    row = {"family": family.name, "attention": attention, "model": family.model}
    model = build(family, ARCH, attention)
    example = inputs(family, 1, TRACE_SEQ, torch.Generator().manual_seed(0))
    started = time.perf_counter()
    try:
        analysis = fxprune.analyze(model, example)
        plan, pruned, head_ratio, refused, warned = prune_or_channels_only(analysis, RATIO, HEAD_RATIO)
    except Exception as exc:  # noqa: BLE001 - the row reports what fxprune does
        return {**row, "error_message": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                "trace": traceback.format_exc()[-1500:]}
    seconds = time.perf_counter() - started
    errors, failure = masked_errors(family, model, plan, pruned, example)
    cols = kind_columns(analysis, plan)
    params = fxprune.count_params(model)
    return {**row, **cols, "head_ratio": head_ratio, "runs_at_other_shapes": not failure, "shape_failure": failure,
            "errors": errors, "error": max(errors.values(), default=float("nan")), "params": params,
            "params_after": fxprune.count_params(pruned), "params_kept": fxprune.count_params(pruned) / params,
            "why_not": why_not(analysis, cols, refused, warned), "seconds": seconds,
            "capture": analysis.gm.meta.get(fxprune.meta.CAPTURE_METHOD, "symbolic")}


def print_markdown(rows: list[dict]) -> None:
    print(f"\n| family | attention | q/k | v | heads | MLP | other batch / length | masked error | "
          f"params kept ({RATIO} + head_ratio {HEAD_RATIO}) | why not |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error_message" in r:
            print(f"| {r['family']} | {r['attention']} | | | | | | | | {r['error_message']} |")
            continue
        cells = " | ".join(short_cell(r[k]) for k in KIND_COLUMNS)
        shapes = "yes" if r["runs_at_other_shapes"] else f"no: {r['shape_failure']}"
        print(f"| {r['family']} | {r['attention']} | {cells} | {shapes} | {r['error']:.1e} | "
              f"{r['params_after']} / {r['params']} ({r['params_kept']:.3f}) | {r['why_not'][:300]} |")


def main() -> None:
    args = family_args(__doc__)
    rows = []
    for family in FAMILIES.values():
        if args.only and family.name not in args.only:
            continue
        for attention in family.attentions:
            row = check(family, attention)
            rows.append(row)
            pruned = ",".join(k for k in KIND_COLUMNS if row.get(k) == "pruned")
            print(f"{family.name:14s} {attention:5s} {pruned:16s} {row.get('error', float('nan')):9.2e} "
                  f"{row.get('params_kept', float('nan')):6.3f} {row.get('seconds', float('nan')):5.1f}s  "
                  f"{row.get('error_message') or row.get('why_not', '')[:160]}", flush=True)
    save_rows(rows, "hf", args)
    if args.markdown:
        print_markdown(rows)


if __name__ == "__main__":
    main()
