"""fxprune: physically smaller transformers by head-aligned channel pruning on the torch.fx graph.

Pipeline (one sub-package or module each): capture -> analysis (op rules) -> importance -> allocate ->
rewrite -> verify. ``fxprune.register_op`` teaches it a new op; ``fxprune.importance.register`` a new
criterion.
"""
from . import importance, models, report, zoo  # noqa: F401  (models registers the FLatten models with timm)
from .analysis import Analysis, Group
from .analysis.rules import register_op
from .api import __version__, apply, check_of, mask, plan, plan_of, prune
from .api import _analysis as _analysis_of
from .auto import auto_prune
from .coverage import PruningShortfallWarning
from .errors import CaptureError, FxpruneError, InvalidArgumentError, PlanError, RewriteError
from .finetune import finetune
from .io import LoadError, load, save
from .plan import Plan
from .rewrite.reweight import fold_reweights
from .to_module import to_module
from .verify import count_macs, count_params, latency, relative_error


def make_attention_visible(model, example_inputs=None):
    """A traced copy of ``model`` in which opaque attention (nn.MultiheadAttention self-attention, torchvision's
    shifted_window_attention) is replaced by explicit, equivalent ops; the copy computes what ``model`` does."""
    from .capture import capture

    return capture(model, example_inputs).gm


def analyze(model, example_inputs=None, untie_shared_convs: bool = False) -> Analysis:
    """Trace a copy of ``model`` and return its coupled channel groups (print it for a table).

    ``untie_shared_convs``: give every head its own copy of a depthwise conv the heads share (see ``plan``)."""
    return _analysis_of(model, example_inputs, untie_shared_convs)


__all__ = [
    # pruning
    "analyze", "plan", "apply", "prune", "mask", "plan_of", "check_of", "auto_prune",
    # after pruning
    "fold_reweights", "finetune", "save", "load", "to_module",
    # measuring
    "count_macs", "count_params", "latency", "relative_error",
    # extending and inspecting
    "register_op", "make_attention_visible", "importance", "zoo", "Analysis", "Group", "Plan",
    # errors
    "FxpruneError", "InvalidArgumentError", "CaptureError", "PlanError", "RewriteError", "LoadError",
    "PruningShortfallWarning",
    "__version__",
]
