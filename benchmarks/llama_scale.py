"""Pruning cost at 1B scale: a Llama-style decoder (random init) pruned at ratio 0.5, phase by phase.

The model is a Hugging Face ``LlamaForCausalLM`` of Llama 3.2 1B's shape with a 32k vocabulary: hidden 2048,
16 layers, 32 query heads and 8 key/value heads (GQA), gated MLP of 5632, RoPE; about 0.85B parameters.
It is built, pruned and measured in a fresh subprocess, so that its peak resident memory belongs to this job
alone. The phases are the calls ``fxprune.prune(model, 0.5, example_inputs=(input_ids,))`` makes, one by one:
capture (trace a copy sharing the weights), analyze (channel groups), plan (importance and allocation),
rewrite (``apply`` without the self-check) and self-check (``check_pruned``: the pruned model against the
masked original). Each phase's wall time, and the process's peak resident set during it (VmHWM, reset before
each phase), as a multiple of the model's size (parameter and buffer bytes). Goals (not tests): the whole call within 30 s, the peak within 2.5x the model.

What was pruned is reported with the numbers: the parameters of every projection (q, k, v, o, gate, up, down)
before and after, and per group kind (qk, v, mlp, heads) how many groups are prunable and how many channels
the plan removed, so the timings stay comparable as fxprune learns to prune more of Llama.

    python benchmarks/llama_scale.py --markdown     # table + benchmarks/results/llama_scale.json
    python benchmarks/llama_scale.py --layers 4     # a smaller model

Wall times are on this machine (2 threads); compare within one run only, and mind the machine's load (the
table prints the load average before and after: a busy machine slows every phase, small torch ops most).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
GOAL_SECONDS, GOAL_MEMORY = 30.0, 2.5
PHASES = ("capture", "analyze", "plan", "rewrite", "self-check")
GB = 1024 ** 3


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def resident() -> float:
    """The process's resident set now, in bytes."""
    return _status_kb("VmRSS") * 1024.0


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak() -> float:
    """The process's peak resident set since the last ``reset_peak``, in bytes."""
    return _status_kb("VmHWM") * 1024.0


def build(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(getattr(torch, args.dtype)).eval()


def model_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def params_by_projection(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts summed by the name of the module that holds them (q_proj, up_proj, lm_head, ...)."""
    counts: Counter = Counter()
    for name, p in model.named_parameters():
        counts[name.rsplit(".", 2)[-2] if name.count(".") else name] += p.numel()
    return dict(counts)


def kinds_pruned(analysis, plan) -> dict[str, dict]:
    """Per group kind: groups, prunable groups, channels (atoms) in prunable groups, and how many the plan removed."""
    out: dict[str, dict] = {}
    for group in analysis.groups:
        row = out.setdefault(group.kind, {"groups": 0, "prunable": 0, "channels": 0, "removed": 0})
        row["groups"] += 1
        if group.prunable:
            row["prunable"] += 1
            row["channels"] += len(group.atoms)
            row["removed"] += sum(len(r) for r in plan.removed.get(group.name, []))
    return out


def run_phases(model: torch.nn.Module, inputs: tuple, ratio: float, log) -> tuple[list[dict], dict]:
    """``fxprune.prune``'s steps one by one, timed, with their peak memory; stops at the first that fails."""
    import fxprune
    from fxprune.analysis import analyze_captured
    from fxprune.capture import capture
    from fxprune.check import check_pruned

    state: dict = {}
    steps = {
        "capture": lambda: state.update(captured=capture(model, inputs)),
        "analyze": lambda: state.update(analysis=analyze_captured(state["captured"])),
        "plan": lambda: state.update(plan=fxprune.plan(state["analysis"], ratio)),
        "rewrite": lambda: state.update(pruned=fxprune.apply(state["analysis"], state["plan"], verify=False)),
        "self-check": lambda: state.update(check=check_pruned(
            state["analysis"], state["plan"].removed_atoms(state["analysis"]), state["pruned"])),
    }
    phases = []
    for name, step in steps.items():
        reset_peak()
        started = time.perf_counter()
        row = {"phase": name}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
            row["warnings"] = [str(w.message) for w in caught]
        except Exception as exc:  # noqa: BLE001 - a failing phase is the result
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else type(exc).__name__
        row.update(seconds=time.perf_counter() - started, peak_bytes=peak(), after_bytes=resident())
        phases.append(row)
        log(f"  {name:10s} {row['seconds']:6.1f}s  peak {row['peak_bytes'] / GB:5.1f} GB"
            + (f"  FAILED {row['error']}" if "error" in row else ""))
        if "error" in row:
            break
    return phases, state


def child(args) -> dict:
    """Build the model, prune it phase by phase, and say what was pruned (runs in a fresh process)."""
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731 - stdout carries the JSON
    interpreter = resident()
    started = time.perf_counter()
    model = build(args)
    size = model_bytes(model)
    log(f"  built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters ({size / GB:.1f} GB, "
        f"{args.dtype}) in {time.perf_counter() - started:.0f}s")
    inputs = (torch.randint(0, args.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0)),)
    with_model = resident()
    load_before = os.getloadavg()[0]
    phases, state = run_phases(model, inputs, args.ratio, log)
    result = {"model_bytes": size, "rss_interpreter_bytes": interpreter, "rss_with_model_bytes": with_model,
              "phases": phases, "params_before": params_by_projection(model),
              "load_average": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count()}
    if "pruned" in state:
        result["params_after"] = params_by_projection(state["pruned"])
    if "plan" in state:
        result["kinds"] = kinds_pruned(state["analysis"], state["plan"])
        result["kinds_asked"] = state["plan"].options.get("kinds")
        result["coverage"] = state["plan"].options.get("coverage")
    if "check" in state:
        result["check_error"] = state["check"].error
    return result


def in_fresh_process(args) -> dict:
    """Run ``child`` in a new interpreter; its log goes to stderr, its result comes back as JSON."""
    command = [sys.executable, __file__, "--child"] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                       if k in CHILD_OPTIONS]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
        return {"error": f"the measuring process exited with {done.returncode}{killed}"}
    return json.loads(done.stdout)


CHILD_OPTIONS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "dtype", "tokens", "ratio",
                 "threads")


def _gb(value: float) -> str:
    return f"{value / GB:.2f}"


def markdown(result: dict, args) -> str:
    if "error" in result:
        return f"\n**Llama-style decoder**: {result['error']}"
    size = result["model_bytes"]
    before, after = result["params_before"], result.get("params_after", {})
    total_before, total_after = sum(before.values()), sum(after.values()) if after else None
    phases = result["phases"]
    seconds = sum(p["seconds"] for p in phases)
    top = max(p["peak_bytes"] for p in phases)
    finished = len(phases) == len(PHASES) and "error" not in phases[-1]
    lines = [f"\n**Llama-style decoder**: hidden {args.hidden}, {args.layers} layers, {args.heads} q / {args.kv_heads} kv "
             f"heads, MLP {args.intermediate}, vocab {args.vocab}, {args.dtype}; {total_before / 1e9:.2f}B parameters, "
             f"{_gb(size)} GB; ratio {args.ratio}, input_ids (1, {args.tokens}), {args.threads} threads\n",
             "| phase | wall (s) | peak RSS (GB) | peak / model size |", "|---|---|---|---|"]
    for p in phases:
        note = f" (failed: {p['error']})" if "error" in p else ""
        lines.append(f"| {p['phase']}{note} | {p['seconds']:.1f} | {_gb(p['peak_bytes'])} | "
                     f"{p['peak_bytes'] / size:.2f}x |")
    verdict = lambda ok: "met" if ok and finished else "missed"  # noqa: E731
    lines += [f"| **total** | **{seconds:.1f}** (goal {GOAL_SECONDS:.0f}: {verdict(seconds <= GOAL_SECONDS)}) | "
              f"**{_gb(top)}** | **{top / size:.2f}x** (goal {GOAL_MEMORY}x: {verdict(top <= GOAL_MEMORY * size)}) |",
              f"\nResident before building the model {_gb(result['rss_interpreter_bytes'])} GB (interpreter, torch, "
              f"transformers), with the model {_gb(result['rss_with_model_bytes'])} GB; peak above the interpreter "
              f"{(top - result['rss_interpreter_bytes']) / size:.2f}x the model size."
              + (f" Load average (1 min) {result['load_average'][0]:.1f} before the phases and "
                 f"{result['load_average'][1]:.1f} after, on {result['cpus']} CPUs." if "load_average" in result else "")
              + "\n",
              "| parameters | before | after | kept |", "|---|---|---|---|"]
    for name in sorted(before, key=lambda n: -before[n]):
        kept = f"{after[name] / before[name]:.1%}" if name in after else "-"
        lines.append(f"| {name} | {before[name] / 1e6:.1f}M | {after.get(name, 0) / 1e6:.1f}M | {kept} |")
    if total_after is not None:
        lines.append(f"| **all** | {total_before / 1e6:.1f}M | {total_after / 1e6:.1f}M | "
                     f"{total_after / total_before:.1%} |")
    if "kinds" in result:
        lines += [f"\nKinds the plan prunes: {', '.join(result.get('kinds_asked') or [])}.\n",
                  "| group kind | groups | prunable | channels in prunable groups | removed by the plan |",
                  "|---|---|---|---|---|"]
        for kind, k in result["kinds"].items():
            lines.append(f"| {kind} | {k['groups']} | {k['prunable']} | {k['channels']} | {k['removed']} |")
    coverage = result.get("coverage") or {}
    if coverage.get("short"):
        lines.append(f"\nThe plan removed {coverage['reached']:.1%} of the channels where {coverage['asked']:.0%} "
                     f"was asked; frozen groups, most common reasons: "
                     + "; ".join(f"{why} ({n})" for why, n in coverage.get("frozen", [])))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of the example input_ids")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", default=str(RESULTS / "llama_scale.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    started = time.perf_counter()
    result = in_fresh_process(args)
    result["config"] = {k: getattr(args, k) for k in CHILD_OPTIONS}
    result["seconds"] = time.perf_counter() - started
    Path(args.json).parent.mkdir(exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(markdown(result, args) if args.markdown else json.dumps(result.get("phases", result)))
    print(f"total {result['seconds']:.0f}s (building the model included)")


if __name__ == "__main__":
    main()
