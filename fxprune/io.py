"""Saving and loading pruned models without pickle.

A saved model is a directory with two files:

- ``plan.json``: the plan (kept channels per group), how the model was captured (architecture name, timm
  constructor arguments, example input shapes), the reweight nodes present, and the fxprune / torch versions;
- ``weights.safetensors``: the pruned GraphModule's state dict.

``load`` rebuilds the pruned model from the original architecture by replaying the plan, then loads the
weights. Nothing in the directory is executed or unpickled. ``save`` writes into a temporary directory and
renames it into place, so a failed save never leaves a directory that loads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.fx as fx

from . import meta
from .errors import FxpruneError, PlanError
from .plan import Plan

FORMAT = "fxprune-saved-model"
VERSION = 1
PLAN_FILE, WEIGHTS_FILE = "plan.json", "weights.safetensors"


class LoadError(FxpruneError):
    """A saved model directory is missing, damaged, or does not fit the architecture."""


def save(pruned: fx.GraphModule, directory: str | os.PathLike, *, architecture: str | None = None,
         model_args: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``pruned`` (made by fxprune) to ``directory``: plan.json + weights.safetensors."""
    from safetensors.torch import save_file

    from . import __version__
    from .api import plan_of

    plan = plan_of(pruned)
    target = Path(directory)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FxpruneError(f"fxprune: {target} exists and is not empty; pass overwrite=True or choose another directory")
    architecture = architecture or pruned.meta.get(meta.ARCHITECTURE)
    model_args = model_args if model_args is not None else pruned.meta.get(meta.MODEL_ARGS, {})
    reweighted = sorted({name.rsplit("_", 1)[0] for name, _ in pruned.named_parameters() if name.startswith(meta.REWEIGHT_PREFIX)})
    record = {
        "format": FORMAT, "version": VERSION, "fxprune": __version__, "torch": torch.__version__,
        "architecture": architecture, "model_args": model_args, "plan": plan.to_dict(),
        "reweights": pruned.meta.get(meta.REWEIGHTED_NODES, []) if reweighted else [],
    }
    state = {k: v.detach().contiguous() for k, v in pruned.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (staging / PLAN_FILE).write_text(json.dumps(record, indent=1, sort_keys=True))
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_record(directory: str | os.PathLike) -> dict:
    path = Path(directory) / PLAN_FILE
    if not path.is_file():
        raise LoadError(f"fxprune: {directory} holds no {PLAN_FILE}; is it a directory written by fxprune.save?")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoadError(f"fxprune: {path} is damaged ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise LoadError(f"fxprune: {path} is not an fxprune saved model")
    if record.get("version") != VERSION:
        raise LoadError(f"fxprune: {path} has format version {record.get('version')}, this fxprune reads {VERSION}")
    return record


def load(directory: str | os.PathLike, model: torch.nn.Module | None = None) -> fx.GraphModule:
    """Rebuild a saved pruned model: replay its plan on ``model`` (or on the recorded timm architecture)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .api import _inputs_from_plan, apply

    record = read_record(directory)
    try:
        plan = Plan.from_dict(record["plan"])
    except (KeyError, TypeError, ValueError, PlanError) as exc:
        raise LoadError(f"fxprune: the plan in {directory} is damaged ({exc})") from exc
    if model is None:
        if not record.get("architecture"):
            raise LoadError("fxprune: the saved model records no architecture; pass the original model: load(dir, model=...)")
        import timm

        from . import models  # noqa: F401  (FLatten architectures)

        model = timm.create_model(record["architecture"], **(record.get("model_args") or {}))
    model = model.eval()
    pruned = apply(model, plan, example_inputs=_inputs_from_plan(plan))
    if record.get("reweights"):
        from .rewrite.reweight import insert_reweights

        fits = {}
        for name in record["reweights"]:
            node = next((n for n in pruned.graph.nodes if n.name == name), None)
            if node is None:
                raise LoadError(f"fxprune: the saved model has a reweight before '{name}', which the rebuilt graph lacks")
            module_width = _input_width(pruned, node)
            fits[name] = (torch.ones(module_width), torch.zeros(module_width))  # values come from the weights
        insert_reweights(pruned, fits)
    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise LoadError(f"fxprune: {directory} holds no {WEIGHTS_FILE}")
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"fxprune: {weights_path} is damaged ({exc})") from exc
    expected = pruned.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LoadError(f"fxprune: the weights do not fit the rebuilt model (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); was the plan made for another architecture?")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise LoadError(f"fxprune: weight '{key}' has shape {tuple(value.shape)}, the rebuilt model "
                            f"{tuple(expected[key].shape)}; the files do not belong together")
    pruned.load_state_dict(state)
    pruned.meta[meta.ARCHITECTURE] = record.get("architecture")
    pruned.meta[meta.MODEL_ARGS] = record.get("model_args") or {}
    return pruned


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``.pth`` holding tensors only (``{"model": ...}`` unwrapped).

    ``torch.load`` runs with ``weights_only=True``: no code from the file is executed.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def _input_width(gm: fx.GraphModule, linear: fx.Node) -> int:
    if linear.op == "call_module":
        return gm.get_submodule(str(linear.target)).in_features
    weight = linear.args[1] if len(linear.args) > 1 else linear.kwargs["weight"]
    return gm.get_parameter(str(weight.target)).shape[1]
