"""Pass: keep the softmax temperature of scaled_dot_product_attention when head_dim shrinks.

SDPA's default scale is 1/sqrt(q.size(-1)); after pruning that would be 1/sqrt(new head_dim) and change
the model. The original scale is passed explicitly instead.
"""
from __future__ import annotations

import math
from typing import Any

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta


def keep_attention_scale(gm: fx.GraphModule, shapes: dict[str, Any]) -> PassResult:
    modified = False
    for node in gm.graph.nodes:
        call = node.meta.get(meta.OP)
        if call is None or call.op != "sdpa":
            continue
        if call.args.get("scale") is not None:
            continue
        query = call.args["query"]
        old_dim = query.meta[meta.VALUE].shape[-1]
        if shapes[query.name][-1] != old_dim:
            node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(old_dim)}
            modified = True
    return PassResult(gm, modified)
