"""Before/after reports: one row per model (params, MACs, latency per batch size, masked error), as a table."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .verify import count_macs, count_params, latency, relative_error


def measure(name: str, model: nn.Module, inputs: dict[int, torch.Tensor], reference: nn.Module | None = None,
            repeats: int = 5, prune_s: float | None = None) -> dict:
    """Params, MACs (batch 1), median latency per batch size, and the error against ``reference``."""
    first = inputs[min(inputs)]
    error = None
    if reference is not None:
        with torch.no_grad():
            error = relative_error(model(first), reference(first))
    return {
        "name": name,
        "params": count_params(model),
        "macs": count_macs(model, (first[:1],)),
        "latency_ms": {b: latency(model, (x,), repeats=repeats) for b, x in inputs.items()},
        "masked_error": error,
        "prune_s": prune_s,
    }


def table(rows: Sequence[dict]) -> str:
    """A fixed-width table; speedups are relative to the first row."""
    base = rows[0]
    batches = list(base["latency_ms"])
    header = ["model", "params (M)", "MACs (G)"] + [f"ms @ b{b}" for b in batches] + \
             [f"speedup b{b}" for b in batches] + ["masked err", "prune s"]
    lines = [header]
    for row in rows:
        lines.append([row["name"], f"{row['params'] / 1e6:.2f}", f"{row['macs'] / 1e9:.2f}"]
                     + [f"{row['latency_ms'][b]:.1f}" for b in batches]
                     + [f"{base['latency_ms'][b] / row['latency_ms'][b]:.2f}x" for b in batches]
                     + ["-" if row["masked_error"] is None else f"{row['masked_error']:.1e}",
                        "-" if row["prune_s"] is None else f"{row['prune_s']:.2f}"])
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    out = []
    for i, r in enumerate(lines):
        out.append("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
