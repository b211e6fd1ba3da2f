"""Make opaque attention visible: replace attention that fx sees as one node by explicit, equivalent ops.

- ``nn.MultiheadAttention`` is a leaf module for fx (torchvision's ViT uses it). Self-attention calls become
  the packed in-projection (``F.linear``), a head split, ``F.scaled_dot_product_attention`` and the output
  projection module.
- torchvision's ``shifted_window_attention`` (Swin, Swin-v2) is an fx-wrapped function that receives the
  weights as arguments. Its calls become the same window partition, attention with relative position bias
  (cosine attention with the per-head logit scale for v2), shifted-window mask and window merge, traced
  with the static sizes of the example input; the mask becomes a buffer.

Both keep batch size dynamic and compute what the original computes (to float rounding). Calls these passes
cannot express (cross-attention, key padding masks, returned attention weights, ...) stay opaque and
their channels frozen.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult
import torch.nn as nn
import torch.nn.functional as F

from .. import meta
from .values import TensorValue


def _inline(gm: fx.GraphModule, before: fx.Node, fn: Callable, args: dict[str, Any]) -> fx.Node:
    """Run ``fn`` on proxies of the node arguments (the rest as given), recording its ops in front of ``before``."""
    tracer = fx.proxy.GraphAppendingTracer(gm.graph)
    call = {k: fx.Proxy(v, tracer) if isinstance(v, fx.Node) else v for k, v in args.items()}
    with gm.graph.inserting_before(before):
        out = fn(**call)
    return out.node


def _calls(gm: fx.GraphModule, targets: tuple):
    """(node, all arguments by name, defaults filled in) of every call of one of ``targets``."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in targets:
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            yield node, dict(bound.arguments)


def _buffer(gm: fx.GraphModule, before: fx.Node, name: str, value: torch.Tensor) -> fx.Node:
    gm.register_buffer(name, value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


# --- nn.MultiheadAttention ---------------------------------------------------------------------------------


def _mha_body(heads: int, embed: int, batch_first: bool, dropout: float) -> Callable:
    head_dim = embed // heads

    def body(x, weight, bias):
        if not batch_first:
            x = x.transpose(0, 1)
        qkv = F.linear(x, weight, bias)
        q, k, v = qkv.reshape(x.size(0), x.size(1), 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(x.size(0), x.size(1), embed)
        return out if batch_first else out.transpose(0, 1)

    return body


def _mha_call(node: fx.Node, module: nn.MultiheadAttention) -> tuple[fx.Node, float] | None:
    """The input of a plain self-attention call of ``module`` (and its dropout), or None."""
    names = ["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal"]
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    query = bound.get("query")
    if not (query is bound.get("key") is bound.get("value")) or not isinstance(query, fx.Node):
        return None
    if any(bound.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or bound.get("is_causal"):
        return None
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        return None
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and user.args[1] in (0, 1)):
            return None
        if user.args[1] == 1 and user.users:
            return None  # attention weights are used
    return query, module.dropout if module.training else 0.0


def decompose_multihead_attention(gm: fx.GraphModule) -> int:
    """Replace self-attention calls of nn.MultiheadAttention modules by explicit ops. Returns the count."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, nn.MultiheadAttention):
            continue
        call = _mha_call(node, module)
        if call is None:
            continue
        query, dropout = call
        path = str(node.target)
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{path}.in_proj_weight")
            bias = gm.graph.get_attr(f"{path}.in_proj_bias") if module.in_proj_bias is not None else None
        body = _mha_body(module.num_heads, module.embed_dim, module.batch_first, dropout)
        attended = _inline(gm, node, body, {"x": query, "weight": weight, "bias": bias})
        with gm.graph.inserting_before(node):
            out = gm.graph.call_module(f"{path}.out_proj", (attended,))
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        count += 1
    return count


# --- torchvision shifted_window_attention ------------------------------------------------------------------


def _window_mask(pad_h: int, pad_w: int, window: list[int], shift: list[int]) -> torch.Tensor:
    """The shifted-window attention mask torchvision builds on the fly, as a constant."""
    mask = torch.zeros(pad_h, pad_w)
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    windows = (pad_h // window[0]) * (pad_w // window[1])
    mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(windows, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _swin_body(height: int, width: int, channels: int, window: list[int], heads: int, shift: list[int],
               attention_dropout: float, dropout: float, training: bool, cosine: bool) -> tuple[Callable, dict]:
    pad_r = (window[1] - width % window[1]) % window[1]
    pad_b = (window[0] - height % window[0]) % window[0]
    pad_h, pad_w = height + pad_b, width + pad_r
    shift = [0 if window[0] >= pad_h else shift[0], 0 if window[1] >= pad_w else shift[1]]
    windows = (pad_h // window[0]) * (pad_w // window[1])
    tokens = window[0] * window[1]
    head_dim = channels // heads
    shifted = sum(shift) > 0

    def body(x, qkv_weight, proj_weight, relative_position_bias, qkv_bias, proj_bias, logit_scale, mask, k_keep):
        batch = x.size(0)
        if pad_r or pad_b:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        x = x.view(batch, pad_h // window[0], window[0], pad_w // window[1], window[1], channels)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * windows, tokens, channels)
        if k_keep is not None:
            qkv_bias = qkv_bias * k_keep  # v2 zeroes the key bias
        qkv = F.linear(x, qkv_weight, qkv_bias)
        qkv = qkv.reshape(batch * windows, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if cosine:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * head_dim ** -0.5).matmul(k.transpose(-2, -1))
        attn = attn + relative_position_bias
        if shifted:
            attn = attn.view(batch, windows, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, heads, tokens, tokens)
        attn = F.softmax(attn, dim=-1)
        if training and attention_dropout > 0:
            attn = F.dropout(attn, p=attention_dropout, training=True)
        x = attn.matmul(v).transpose(1, 2).reshape(batch * windows, tokens, channels)
        x = F.linear(x, proj_weight, proj_bias)
        if training and dropout > 0:
            x = F.dropout(x, p=dropout, training=True)
        x = x.view(batch, pad_h // window[0], pad_w // window[1], window[0], window[1], channels)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
        if shifted:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        if pad_r or pad_b:
            x = x[:, :height, :width, :]
        return x.contiguous()

    return body, {"shifted": shifted, "pad_h": pad_h, "pad_w": pad_w, "shift": shift}


def _swin_targets() -> tuple[Callable, ...]:
    try:
        from torchvision.models.swin_transformer import shifted_window_attention
    except ImportError:  # pragma: no cover
        return ()
    return (shifted_window_attention,)


def decompose_shifted_window_attention(gm: fx.GraphModule) -> int:
    """Replace torchvision shifted_window_attention calls by explicit ops. Returns the count."""
    count = 0
    for node, a in _calls(gm, _swin_targets()):
        value = a["input"].meta.get(meta.VALUE) if isinstance(a["input"], fx.Node) else None
        if not isinstance(value, TensorValue) or len(value.shape) != 4:
            continue
        if any(isinstance(a[k], fx.Node) for k in ("window_size", "num_heads", "shift_size", "training")):
            continue
        _, height, width, channels = value.shape
        cosine = a["logit_scale"] is not None
        body, info = _swin_body(height, width, channels, list(a["window_size"]), a["num_heads"], list(a["shift_size"]),
                                a["attention_dropout"], a["dropout"], bool(a["training"]), cosine)
        mask = _buffer(gm, node, f"{meta.BUFFER_PREFIX}window_mask_{count}",
                       _window_mask(info["pad_h"], info["pad_w"], list(a["window_size"]), info["shift"])) \
            if info["shifted"] else None
        k_keep = None
        if cosine and a["qkv_bias"] is not None:
            keep = torch.ones(3 * channels)
            keep[channels:2 * channels] = 0
            k_keep = _buffer(gm, node, f"{meta.BUFFER_PREFIX}key_bias_keep_{count}", keep)
        args = {name: a[name] for name in ("qkv_weight", "proj_weight", "relative_position_bias", "qkv_bias",
                                            "proj_bias", "logit_scale")}
        args.update(x=a["input"], mask=mask, k_keep=k_keep)
        out = _inline(gm, node, body, args)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        count += 1
    return count


# --- small helpers that fx only wraps for convenience -------------------------------------------------------


def _inlinable() -> dict[Callable, tuple[str, ...]]:
    """Leaf functions whose body traces once their non-tensor arguments are fixed: function -> tensor args."""
    table: dict[Callable, tuple[str, ...]] = {}
    try:
        from torchvision.models.swin_transformer import _get_relative_position_bias

        table[_get_relative_position_bias] = ("relative_position_bias_table", "relative_position_index")
    except ImportError:  # pragma: no cover
        pass
    return table


def inline_helpers(gm: fx.GraphModule) -> int:
    """Inline calls of known wrapped helpers (e.g. torchvision's relative position bias gather)."""
    table = _inlinable()
    count = 0
    for node, args in _calls(gm, tuple(table)):
        if any(isinstance(v, fx.Node) for k, v in args.items() if k not in table[node.target]):
            continue
        out = _inline(gm, node, node.target, args)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        count += 1
    return count


def _autocast_off_regions(gm: fx.GraphModule):
    """(node, subgraph module, operands) of every export region run with autocast disabled."""
    wrap = getattr(torch.ops.higher_order, "wrap_with_autocast", None)
    for node in list(gm.graph.nodes):
        if wrap is None or node.op != "call_function" or node.target is not wrap or len(node.args) < 5:
            continue
        enabled, body = node.args[2], node.args[4]
        if enabled is not False or not isinstance(body, fx.Node) or body.op != "get_attr":
            continue
        sub = getattr(gm, str(body.target), None)
        if not isinstance(sub, fx.GraphModule) or any(n.op in ("get_attr", "call_module") for n in sub.graph.nodes):
            continue
        if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
            continue
        yield node, body, sub, node.args[5:]


def inline_autocast_off(gm: fx.GraphModule) -> int:
    """torch.export wraps ``with torch.autocast(..., enabled=False)`` blocks (EfficientViT's linear attention) in
    a higher-order op whose body the op rules cannot see. Disabling autocast changes nothing where no autocast is
    active (the graph computes in the model's own dtype, as the self-check runs it), so the body is inlined."""
    count = 0
    for node, body, sub, operands in list(_autocast_off_regions(gm)):
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            continue
        env: dict[fx.Node, Any] = dict(zip(placeholders, operands))
        outputs = None
        with gm.graph.inserting_before(node):
            for inner in sub.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    outputs = fx.node.map_arg(inner.args[0], lambda n: env[n])
                    continue
                env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
        outputs = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
        for user in list(node.users):
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not body.users:
            gm.graph.erase_node(body)
            if not any(n.op == "get_attr" and n.target == body.target for n in gm.graph.nodes):
                delattr(gm, str(body.target))
        count += 1
    return count


def make_attention_visible(gm: fx.GraphModule) -> PassResult:
    """Pass: run every decomposition on ``gm`` (in place)."""
    count = (decompose_multihead_attention(gm) + decompose_shifted_window_attention(gm) + inline_helpers(gm)
             + inline_autocast_off(gm))
    if count:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, count > 0)
