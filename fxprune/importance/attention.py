"""Attention difference: how much each channel changes the attention outputs (·V) it takes part in.

The difference between an attention's output with and without a channel is estimated to first order on
calibration data: with a gate g per channel (1 = kept), ‖out(g) − out(g − e_a)‖² ≈ ‖∂out/∂g_a‖², summed over
every attention output and the model output (so channels after the last attention count too), and the
squared Jacobian norms of every channel at once come from random probes, E_r[(∂(r·out)/∂g_a)²]
(Hutchinson). It serves softmax and linear attention alike, since it only differentiates the graph. It is
the initialisation of the automatic method's indicators ("Automatic Channel Pruning for Multi-Head
Attention", Lee & Hwang 2024), also usable on its own.
"""
from __future__ import annotations

import torch

from ..gating import AttentionRecorder, gated_graph
from . import heads_from_channels, register
from ..data import batches, input_names


@register("attention", needs_data=True)
def attention(analysis, data=None, max_batches: int | None = 4, probes: int = 4, seed: int = 0, **_) -> torch.Tensor:
    gm = gated_graph(analysis).eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    scores = torch.zeros(analysis.atoms.count, dtype=torch.float64)
    for inputs in batches(data, max_batches, input_names(analysis.gm)):
        for _ in range(probes):
            gates = torch.ones(analysis.atoms.count, requires_grad=True)
            recorder = AttentionRecorder(gm)
            output = recorder.run(gates, *inputs)
            # the model output too: channels after the last attention (its MLP) change nothing else
            outputs = recorder.outputs + ([output] if isinstance(output, torch.Tensor) else [])
            probe = sum((torch.randn(o.shape, generator=generator) * o).sum() for o in outputs)
            (grad,) = torch.autograd.grad(probe, gates)
            scores += grad.to(torch.float64).square()
    return heads_from_channels(analysis, scores, reduce="sum")
