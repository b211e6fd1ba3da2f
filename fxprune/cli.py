"""The ``fxprune`` command: inspect, prune and bench models from the shell.

    fxprune inspect deit_small_patch16_224
    fxprune prune deit_small_patch16_224 --ratio 0.5 --head-ratio 0.25 --out deit_s_pruned
    fxprune bench deit_s_pruned --batches 1 8
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fxprune
from fxprune.errors import FxpruneError
from fxprune.io import read_checkpoint


def _model_args(pairs: list[str]) -> dict:
    args = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise FxpruneError(f"fxprune: --model-arg takes key=value, got {pair!r}")
        try:
            args[key] = json.loads(value)
        except json.JSONDecodeError:
            args[key] = value
    return args


def _model(spec: str, model_args: dict, checkpoint: str | None):
    """A saved fxprune directory or a timm model name."""
    if Path(spec).is_dir():
        return fxprune.load(spec), None
    import timm

    from fxprune import models  # noqa: F401  (FLatten architectures)

    if spec not in timm.list_models():
        raise FxpruneError(f"fxprune: {spec!r} is neither a saved fxprune directory nor a timm model name")
    model = timm.create_model(spec, **model_args).eval()
    if checkpoint:
        model.load_state_dict(read_checkpoint(checkpoint))
    return model, model.pretrained_cfg.get("input_size")


def _inputs(model, input_size, batch: int = 1) -> tuple:
    if input_size is None:  # a saved pruned model: the input size it was pruned with
        shapes = fxprune.plan_of(model).options.get("input_shapes") or [[1, 3, 224, 224]]
        return (torch.randn(batch, *shapes[0][1:]),)
    from fxprune.capture import resolve_example_inputs

    (example,) = resolve_example_inputs(model, None)  # honours img_size given to the constructor
    return (torch.randn(batch, *example.shape[1:]),)


def cmd_inspect(args) -> int:
    model, size = _model(args.model, _model_args(args.model_arg), args.checkpoint)
    analysis = fxprune.analyze(model, _inputs(model, size), untie_shared_convs=args.untie)
    print(analysis)
    total = fxprune.count_macs(analysis.gm, analysis.captured.example_inputs)
    print(f"\nMACs {total / 1e9:.3f} G, params {fxprune.count_params(analysis.gm) / 1e6:.3f} M")
    print("share of the MACs that each prunable group's channels cost:")
    from fxprune.auto import channel_costs

    groups = [g for g in analysis.groups if g.prunable and g.kind in ("qk", "v", "mlp")]
    costs = channel_costs(analysis, groups)
    for group in groups:
        share = float(costs[torch.tensor(group.atoms)].sum()) / total
        print(f"  {group.name:50s} {100 * share:6.2f} %")
    coverage = analysis.coverage()
    print(f"at most {100 * coverage['removable_macs']:.1f}% of the MACs can be removed (qk, v, mlp)")
    for reason, count in coverage["frozen"]:
        print(f"  frozen ({count} group{'s' if count > 1 else ''}): {reason}")
    return 0


def cmd_prune(args) -> int:
    model_args = _model_args(args.model_arg)
    model, size = _model(args.model, model_args, args.checkpoint)
    inputs = _inputs(model, size)
    started = time.perf_counter()
    pruned = fxprune.prune(model, args.ratio, example_inputs=inputs, importance=args.importance,
                           head_ratio=args.head_ratio, heads=args.heads, target_macs=args.target_macs,
                           target_latency=args.target_latency, untie_shared_convs=args.untie, kinds=tuple(args.kinds))
    seconds = time.perf_counter() - started
    rows = [fxprune.report.measure("original", model, {1: inputs[0]}, repeats=args.repeats),
            fxprune.report.measure("pruned", pruned, {1: inputs[0]}, repeats=args.repeats, prune_s=seconds)]
    print(fxprune.report.table(rows))
    if args.out:
        fxprune.save(pruned, args.out, architecture=None if Path(args.model).is_dir() else args.model,
                     model_args=model_args, overwrite=args.overwrite)
        print(f"saved to {args.out}")
    return 0


def cmd_bench(args) -> int:
    model, size = _model(args.model, _model_args(args.model_arg), None)
    inputs = {b: _inputs(model, size, b)[0] for b in args.batches}
    row = fxprune.report.measure(args.model, model, inputs, repeats=args.repeats)
    print(fxprune.report.table([row]))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxprune", description="Head-aligned channel pruning of vision transformers.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="a timm model name or a directory written by fxprune prune --out")
    common.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="timm constructor argument, e.g. img_size=224 (repeatable)")
    common.add_argument("--repeats", type=int, default=5, help="latency repeats")
    inspect = sub.add_parser("inspect", parents=[common], help="print the channel groups and their share of MACs")
    inspect.add_argument("--checkpoint", help="weights (.pth state_dict or .safetensors) to load first")
    inspect.add_argument("--untie", action="store_true", help="untie depthwise convs shared by heads")
    inspect.set_defaults(run=cmd_inspect)
    prune = sub.add_parser("prune", parents=[common], help="prune and print a before/after table; --out saves")
    prune.add_argument("--ratio", type=float, help="fraction of every head's channels to remove")
    prune.add_argument("--head-ratio", type=float, default=0.0, help="fraction of every attention's heads to remove")
    prune.add_argument("--heads", choices=["kv_groups", "q_heads"], default="kv_groups",
                       help="grouped-query attention: remove whole kv groups, or query heads inside every kv group")
    prune.add_argument("--target-macs", type=float, help="MACs to keep, as a fraction (instead of --ratio)")
    prune.add_argument("--target-latency", type=float,
                       help="estimated latency at batch 1 on this machine to keep, as a fraction (instead of --ratio)")
    prune.add_argument("--importance", default="l2", help="l2, l1, dimap, random (data-free criteria)")
    prune.add_argument("--kinds", nargs="+", default=["qk", "v", "mlp"],
                       help="what to prune: qk, v, mlp (channels), heads (whole heads), residual (the residual "
                            "stream's width), depth (whole residual branches) or layers (whole blocks)")
    prune.add_argument("--checkpoint", help="weights (.pth state_dict or .safetensors) to load first")
    prune.add_argument("--untie", action="store_true", help="untie depthwise convs shared by heads")
    prune.add_argument("--out", help="directory to save the pruned model to")
    prune.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    prune.set_defaults(run=cmd_prune)
    bench = sub.add_parser("bench", parents=[common], help="MACs, params and latency at several batch sizes")
    bench.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    bench.add_argument("--json", help="also write the row to this JSON file")
    bench.set_defaults(run=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except FxpruneError as exc:  # one line: the reason; the details stay in the exception for library users
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
