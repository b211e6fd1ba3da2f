"""Small hand-written attention blocks that exercise op rules timm's ViT does not reach."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class OldStyleAttention(nn.Module):
    """Sizes from x.shape, q/k/v by indexing, temperature from q.shape, reshape(B, N, C) from the input."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class SeparateProjections(nn.Module):
    """q, k, v from three Linear layers; a per-channel temperature of width head_dim shared by all heads."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)
        self.temperature = nn.Parameter(torch.rand(dim // heads) + 0.5)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        split = lambda t: t.view(B, N, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)) * self.temperature, split(self.k(x)), split(self.v(x))
        out = F.scaled_dot_product_attention(q, k, v, scale=0.3)
        return self.proj(out.transpose(1, 2).flatten(2))


class SharedDepthwiseOnV(nn.Module):
    """Attention plus a depthwise conv on V whose filters all heads share (as in FLatten)."""

    def __init__(self, dim: int = 16, heads: int = 2, side: int = 3) -> None:
        super().__init__()
        self.heads, self.side = heads, side
        self.qkv = nn.Linear(dim, dim * 3)
        self.dwc = nn.Conv2d(dim // heads, dim // heads, 3, padding=1, groups=dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        d = v.shape[-1]
        conv_in = v.reshape(B * self.heads, self.side, self.side, d).permute(0, 3, 1, 2)
        conv_out = self.dwc(conv_in).reshape(B, self.heads, d, N).transpose(-1, -2)
        return self.proj((out + conv_out).transpose(1, 2).reshape(B, N, C))


class LinearAttention(nn.Module):
    """Kernelised attention: φ(q) (φ(k)ᵀ v) with a normaliser, no softmax."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = F.relu(q), F.relu(k)
        kv = k.transpose(-2, -1) @ v
        z = 1.0 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-3)
        out = (q @ kv) * z
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class ConvMlp(nn.Module):
    """1x1 conv MLP with BatchNorm on the hidden channels."""

    def __init__(self, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.bn(self.fc1(x))))


class CatBiasAttention(nn.Module):
    """BEiT / Swin-v2 style: q and v biases, a zero k bias, concatenated and passed to F.linear."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class UnknownOpMlp(nn.Module):
    """An MLP whose hidden channels pass through an op fxprune has no rule for (cumsum over channels)."""

    def __init__(self, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.fc3, self.fc4 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(torch.cumsum(self.fc1(x), dim=-1))
        return x + self.fc4(F.gelu(self.fc3(x)))


class InterleavedRotary(nn.Module):
    """Rotary embedding in the GPT-J form: channels 2i and 2i + 1 rotate as a pair (``x[..., ::2]``,
    ``x[..., 1::2]``, stacked and flattened), the angles of a buffer repeat_interleave'd to every channel."""

    def __init__(self, dim: int = 16, heads: int = 2, positions: int = 16) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, dim // heads, 2).float() / (dim // heads))
        self.register_buffer("angles", torch.arange(positions).float()[:, None] * inv_freq, persistent=False)
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        split = lambda t: t.view(B, N, self.heads, -1).transpose(1, 2)  # noqa: E731
        angles = self.angles[:N].repeat_interleave(2, dim=-1)
        cos, sin = angles.cos(), angles.sin()
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        q = q * cos + self.rotate_every_two(q) * sin
        k = k * cos + self.rotate_every_two(k) * sin
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class Residual(nn.Module):
    """x + block(x), then a classifier-like head so the block's channels do not reach the output."""

    def __init__(self, block: nn.Module, dim: int) -> None:
        super().__init__()
        self.block = block
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.block(x))


class ChunkedAttention(nn.Module):
    """q, k, v by chunk on the channel dim, heads by unflatten, merged back by flatten."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(-2))
