"""Shared helpers for the tests: small timm ViTs and the masked-equivalence check."""
from __future__ import annotations

import os

import timm
import torch
from hypothesis import settings

import fxprune


def small_vit(embed_per_head: int = 8, num_heads: int = 2, depth: int = 2, mlp_ratio: float = 2.0,
              fused_attn: bool = True, img_size: int = 16, patch_size: int = 8, **kwargs) -> torch.nn.Module:
    model = timm.create_model("vit_tiny_patch16_224", img_size=img_size, patch_size=patch_size, depth=depth,
                              embed_dim=embed_per_head * num_heads, num_heads=num_heads, mlp_ratio=mlp_ratio,
                              num_classes=5, **kwargs)
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
    return randomize(model).eval()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of unit-scale activations: timm's init (std 0.02) makes attention nearly uniform, which would
    hide a wrong softmax temperature or a misaligned head from the equivalence checks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2 and not name.endswith(("pos_embed", "cls_token", "reg_token")):
                fan_in = p[0].numel()
                p.copy_(noise * (1.5 / fan_in ** 0.5))
            elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "fc_norm.weight")):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.5 * noise)
    return model


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys()
    for key, value in snapshot.items():
        assert now[key].shape == value.shape, key
        assert torch.equal(now[key], value), key


def masked_error(model, analysis, plan, pruned, x) -> float:
    reference = fxprune.mask(model, plan, example_inputs=analysis.captured.example_inputs)
    with torch.no_grad():
        return fxprune.relative_error(pruned(x), reference(x))


def examples(ci: int, profile: str | None = None) -> int:
    """``max_examples`` for a slow property test: ``ci`` under the default ``ci`` profile (to keep the suite near
    three minutes), and under any other profile that profile's own count (``HYPOTHESIS_PROFILE=thorough``: 300)."""
    if profile is None:
        current = getattr(settings, "get_current_profile_name", None)  # hypothesis >= 6.1xx
        profile = current() if current else os.environ.get("HYPOTHESIS_PROFILE", "ci")
    return ci if profile == "ci" else settings.get_profile(profile).max_examples
