"""FLatten Transformer (Han et al., "FLatten Transformer: Vision Transformer using Focused Linear Attention",
ICCV 2023), written for fxprune: every size is fixed at construction, so the models trace with torch.fx.

Focused linear attention, per head::

    φ(x) = f_p(ReLU(x) + ε) with f_p(x) = ‖x‖ / ‖xᵖ‖ · xᵖ (norms over all channels, before the head split)
    O    = φ(Q) (φ(K)ᵀ V) ⊙ z  +  DWC(V),    z = 1 / (φ(Q) · mean_N φ(K) + ε)

with Q and K divided by a learnable per-channel softplus(scale), a learnable positional encoding added to K,
(φ(K)ᵀ N^-½)(V N^-½) for numerical range, and a depthwise convolution on V over the token map whose filters
all heads share. Variants (registered with timm):

- ``flatten_deit_tiny_patch16_224`` / ``flatten_deit_small_patch16_224``: DeiT with focused linear attention
  in every block (the class token is left out of the depthwise convolution);
- ``flatten_swin_tiny_patch4_window7_224``: Swin-T whose stages 1-2 use focused linear attention over the
  whole feature map (one window, no shift) and stages 3-4 keep Swin's softmax window attention (window 7).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer


class FocusedLinearAttention(nn.Module):
    """Focused linear attention over ``tokens`` tokens, the last ``side * side`` of which form a square map."""

    def __init__(self, dim: int, num_heads: int, tokens: int, side: int, qkv_bias: bool = True,
                 focusing_factor: float = 3.0, kernel_size: int = 5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if tokens < side * side:
            raise ValueError(f"{tokens} tokens cannot hold a {side}x{side} map")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.tokens, self.side = tokens, side
        self.prefix_tokens = tokens - side * side
        self.focusing_factor = focusing_factor
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2, groups=self.head_dim)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, tokens, dim))

    def focus(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = (F.relu(x) + 1e-6) / scale
        norm = x.norm(dim=-1, keepdim=True)
        x = x ** self.focusing_factor
        return x / x.norm(dim=-1, keepdim=True) * norm

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """``mask`` / ``attn_mask`` / ``is_causal`` are accepted for the host blocks' call signatures; linear
        attention over one window has nothing to mask."""
        batch = x.shape[0]
        k, v = self.kv(x).chunk(2, dim=-1)
        scale = F.softplus(self.scale)
        q = self.split_heads(self.focus(self.q(x), scale))
        k = self.split_heads(self.focus(k + self.positional_encoding, scale))
        v = self.split_heads(v)
        normaliser = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        step = self.tokens ** -0.5
        out = (q @ ((k.transpose(-2, -1) * step) @ (v * step))) * normaliser
        local = v[:, :, self.prefix_tokens:].transpose(-2, -1)
        local = local.reshape(batch * self.num_heads, self.head_dim, self.side, self.side)
        local = self.dwc(local).reshape(batch, self.num_heads, self.head_dim, self.side * self.side)
        local = local.transpose(-2, -1)
        if self.prefix_tokens:  # the class token has no place on the map: it gets no local term
            local = F.pad(local, (0, 0, self.prefix_tokens, 0))
        out = (out + local).transpose(1, 2).reshape(batch, self.tokens, self.num_heads * self.head_dim)
        return self.proj(out)


def _flatten_deit(embed_dim: int, num_heads: int, **kwargs) -> VisionTransformer:
    kwargs.setdefault("img_size", 224)
    kwargs.setdefault("patch_size", 16)
    kwargs.setdefault("depth", 12)
    model = VisionTransformer(embed_dim=embed_dim, num_heads=num_heads, **kwargs)
    side = model.patch_embed.grid_size[0]
    tokens = side * side + model.num_prefix_tokens
    for block in model.blocks:
        block.attn = FocusedLinearAttention(embed_dim, num_heads, tokens, side, qkv_bias=kwargs.get("qkv_bias", True))
    return model


def _flatten_swin(**kwargs) -> SwinTransformer:
    linear_stages = kwargs.pop("linear_stages", 2)
    model = SwinTransformer(**kwargs)
    for stage in list(model.layers)[:linear_stages]:
        for block in stage.blocks:
            side = block.input_resolution[0]
            with warnings.catch_warnings():  # timm resizes the (soon replaced) bias table and warns about it
                warnings.simplefilter("ignore")
                block.set_input_size(feat_size=block.input_resolution, window_size=side)  # one window, no shift
            block.attn = FocusedLinearAttention(block.attn.qkv.in_features, block.attn.num_heads, side * side, side,
                                                qkv_bias=block.attn.qkv.bias is not None)
    return model


def _cfg(**kwargs) -> dict:
    return {"num_classes": 1000, "input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj", **kwargs}


def _model_kwargs(pretrained: bool, kwargs: dict) -> dict:
    """Constructor arguments from what timm.create_model passes (minus its bookkeeping)."""
    if pretrained:
        raise RuntimeError("fxprune ships no FLatten weights: create the model and load yours with load_state_dict")
    return {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}


def _finish(model: nn.Module, classifier: str) -> nn.Module:
    from timm.models._pretrained import PretrainedCfg

    cfg = PretrainedCfg(**_cfg(classifier=classifier))
    model.pretrained_cfg = cfg.to_dict()
    model.default_cfg = model.pretrained_cfg
    return model


@register_model
def flatten_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """FLatten-DeiT-T (about 6.1M parameters, 1.1 GMACs at 224)."""
    args = dict(embed_dim=192, num_heads=3)
    args.update(_model_kwargs(pretrained, kwargs))
    return _finish(_flatten_deit(**args), "head")


@register_model
def flatten_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """FLatten-DeiT-S."""
    args = dict(embed_dim=384, num_heads=6)
    args.update(_model_kwargs(pretrained, kwargs))
    return _finish(_flatten_deit(**args), "head")


@register_model
def flatten_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """FLatten-Swin-T (about 29M parameters, 4.5 GMACs at 224)."""
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    args.update(_model_kwargs(pretrained, kwargs))
    return _finish(_flatten_swin(**args), "head.fc")
