"""Every fact fxprune stores on a graph, in one place.

Passes communicate through ``node.meta`` (per node) and ``GraphModule.meta`` (per graph), as torch.fx's own
passes do. Nothing else in fxprune spells these keys; import them from here.
"""
from __future__ import annotations

# --- node.meta ---------------------------------------------------------------------------------------------
VALUE = "fxprune_value"  # capture: the example output's TensorValue (tensors) or the value (python scalars)
OP = "fxprune_op"  # analysis: the normalised OpCall, or None for an op without a rule
LABELS = "fxprune_labels"  # analysis: the output's channel labels (Blocks); None where it holds no tensor
CONST = "fxprune_const"  # analysis: True when the value depends on parameters only
ATTENTION_OUTPUT = "fxprune_attention_output"  # analysis: this node computes an attention's output (·V)
# analysis: operands read per head through a gather (a rotary cos/sin table shared by all heads):
# list of RowGather (rewrite/gather_rows.py)
ROW_GATHER = "fxprune_row_gather"
# analysis: a grouped (not depthwise) convolution whose input channels are prunable: GroupedInput (the input's
# ids per group); the rewrite gathers each group's kept weight columns (rewrite/slice_grouped.py)
GROUPED_INPUT = "fxprune_grouped_input"
# analysis: weights over positions with no channels of their own (a softmax or normalize over a dim holding no
# ids, of a one-channel score: MobileViT-v2's context scores, SwiftFormer's additive attention); channels
# multiplied by them are pooled by attention, the role of v
ATTENTION_WEIGHTS = "fxprune_attention_weights"
# analysis: a middle range of channels sliced out (a fused q/k/v projection's k): output dim -> Block of the ids
# before the range, whose kept count is the range's new start
SLICE_PREFIX = "fxprune_slice_prefix"
# rewrite: output dim -> the new start of such a range (rewrite/slice_starts.py, read by the slice's resize)
SLICE_START = "fxprune_slice_start"
# analysis: this LayerNorm/RMSNorm normalises a residual stream over its last dim; if the stream loses
# channels, the pruned norm's statistics cover the kept ones only (the self-check's reference does the same)
STREAM_NORM = "fxprune_stream_norm"

# --- GraphModule.meta --------------------------------------------------------------------------------------
CAPTURE_METHOD = "fxprune_capture"  # "torch.export" where capture fell back to export
OPENED_LEAVES = "fxprune_opened_leaves"  # capture: timm "notrace" modules traced into (list of paths)
STATIC_SHAPES = "fxprune_static_shapes"  # capture: why export had to fix the input shapes (None: it did not)
KEPT_LEAVES = "fxprune_kept_leaves"  # capture: timm "notrace" modules kept opaque -> why (not traceable)
PLAN = "fxprune_plan"  # the Plan a pruned module was made with
ARCHITECTURE = "fxprune_architecture"  # timm's architecture name, for save/load
MODEL_ARGS = "fxprune_model_args"  # keyword arguments the architecture was built with, for save/load
REWEIGHTED_NODES = "fxprune_reweighted_nodes"  # nodes that received reweight modules
COMPENSATED = "fxprune_compensated"  # least-squares compensation: list of Fitted (calibration error before/after)
CHECK = "fxprune_check"  # the self-check's CheckResult (what was compared, the error)

# --- names fxprune gives to graph members ------------------------------------------------------------------
BUFFER_PREFIX = "_fxprune_"  # constants fxprune adds to a graph module (window masks, gate indices, masks)
REWEIGHT_PREFIX = "fxprune_reweight"  # reweight parameters (scale and bias per kept input channel)
GATES_PLACEHOLDER = "fxprune_gates"  # gated graphs: the input holding one gate per atom
