"""The channel axis of a residual site, decided from what its branch computes.

mHC mixes ``n`` streams per token and computes its coefficients from a token's ``n·C`` features (arXiv
2512.24880, §4), so the rewrite must know which axis of the residual stream holds the features. It is the
axis that the branch's **last parameterised op** maps over:

    Linear, LayerNorm/RMSNorm over one axis, MultiheadAttention, RNNs   its last axis
    Conv (axis 1; 0 when unbatched), GroupNorm, BatchNorm, InstanceNorm, PReLU(C)   axis 1
    x @ W (W a parameter)                                                    its last axis (W @ x: second-to-last)
    grouped_mm(x, W, offs) (W a parameter [E, K, N]: MoE experts)            its last axis
    x * gamma, x + beta (a parameter with one axis of size > 1: layer scale)  that axis, aligned from the end

followed from that op's output through the ops between it and the add (``axis_rules``: permutes, transposes,
reshapes, indexing, attention, ...) to an axis of the stream. Parameterised ops that map over no single axis
(a scalar gain, a LayerNorm over several axes, an unknown module) pass the axis through like elementwise ops.
When the branch's paths (or parallel branches) reach the add on different axes, or an op loses the axis
(merges it by a reshape, sums over it), the site is left undecided, with the reason, and ``find_residual_sites``
skips it: the axis is never guessed. The channel count is the stream's size on that axis.

Graphs traced without example inputs have no shapes: the same rules run with the ones that need no shape
(reshapes then lose the axis and ask for example inputs), C is read off the parameters, and the reason says so.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .axis_rules import Axis, F, Lost, State, move_axis, node_arg, op_kind, resolve_aten, shape_of
from .sites import ResidualSite

# functional op -> (what it is, position and keyword of its weight)
FUNCTION_SOURCES: dict = {}
for _kind, _position, _targets in (
    ("linear", 1, {F.linear} | resolve_aten("linear.default")),
    ("conv", 1, {torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
                 torch.conv_transpose3d}
     | resolve_aten("conv1d.default", "conv2d.default", "conv3d.default", "convolution.default",
                    "conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input")),
    ("channel_norm", 2, {F.group_norm} | resolve_aten("group_norm.default")),
    ("channel_norm", 3, {F.batch_norm, F.instance_norm}),
    ("channel_norm", 1, resolve_aten("native_group_norm.default", "batch_norm.default", "instance_norm.default",
                                     "native_batch_norm.default", "_native_batch_norm_legit.default",
                                     "_native_batch_norm_legit.no_stats",
                                     "_native_batch_norm_legit_no_training.default",
                                     "_native_batch_norm_legit_functional.default")),
    ("last_norm", 2, {F.layer_norm, F.rms_norm}
     | resolve_aten("layer_norm.default", "native_layer_norm.default", "rms_norm.default")),
    ("addmm", 2, {torch.addmm} | resolve_aten("addmm.default")),
    ("prelu", 1, {F.prelu} | resolve_aten("prelu.default", "_prelu_kernel.default")),
):
    FUNCTION_SOURCES.update({target: (_kind, _position) for target in _targets})
TRANSPOSED_CONVS = {torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d} | resolve_aten(
    "conv_transpose1d.default", "conv_transpose2d.input", "conv_transpose3d.input")
CONVOLUTION = torch.ops.aten.convolution.default
# grouped matmuls (MoE experts: rows sorted by expert, ``offs`` their boundaries; [S, K] x [E, K, N] -> [S, N]), by
# name: a library's own op (transformers' fallback) is registered only once the library is imported
GROUPED_MATMULS = {"aten::_grouped_mm", "transformers::grouped_mm_fallback"}
GROUPED_MATMUL_FUNCTIONS = {getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None)} - {None}
SCALES = {operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub, torch.div,
          "mul", "add", "sub", "div", "__mul__", "__add__", "__sub__", "__truediv__",
          *resolve_aten("mul.Tensor", "add.Tensor", "sub.Tensor", "div.Tensor")}


def _tensor_val(node: fx.Node) -> Optional[torch.Tensor]:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def param_value(arg, gm: fx.GraphModule, body: set) -> Optional[torch.Tensor]:
    """The value (or fake value) of ``arg`` when it is a parameter of the model, or a transpose, view or cast of
    one (``aten.t(weight)``); Dynamo graphs pass parameters as placeholders marked ``meta["mhc_parameter"]``."""
    if not isinstance(arg, fx.Node) or arg in body:
        return None
    node = arg
    for _ in range(4):
        if node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part, None)
            if not isinstance(value, nn.Parameter):
                return None
            return value if node is arg else _tensor_val(arg)
        if node.op == "placeholder":
            return _tensor_val(arg) if node.meta.get("mhc_parameter") else None
        if node.op not in ("call_function", "call_method") or len(node.all_input_nodes) != 1:
            return None
        node = node.all_input_nodes[0]
    return None


def _module_source(module: nn.Module, rank: Optional[int]):
    """(axis, C, rank, None) that a leaf module maps over, or None when it maps over no single axis."""
    found = _module_axis(module, rank)
    if found is None:
        return None
    if rank is None and isinstance(module, nn.modules.conv._ConvNd):
        rank = len(module.kernel_size) + 2  # a convolution's rank is known without shapes (batched input)
    return *found, rank, None


def _module_axis(module: nn.Module, rank: Optional[int]) -> Optional[tuple[int, int]]:
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        return -1, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        spatial = len(module.kernel_size)
        return (rank if rank is not None else spatial + 2) - spatial - 1, module.out_channels
    if isinstance(module, nn.GroupNorm) and module.affine:
        return 1, module.num_channels
    if isinstance(module, nn.modules.batchnorm._NormBase) and module.affine:  # BatchNorm*, InstanceNorm*
        unbatched = isinstance(module, nn.modules.instancenorm._InstanceNorm) and rank == module._get_no_batch_dim()
        return (0 if unbatched else 1), module.num_features
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.elementwise_affine:
        return (-1, module.normalized_shape[0]) if len(module.normalized_shape) == 1 else None
    if isinstance(module, nn.PReLU) and module.num_parameters > 1:
        return 1, module.num_parameters
    if isinstance(module, nn.MultiheadAttention):
        return -1, module.embed_dim
    if isinstance(module, nn.RNNBase):
        return -1, (module.proj_size or module.hidden_size) * (2 if module.bidirectional else 1)
    return None


def _function_source(node: fx.Node, gm: fx.GraphModule, body: set, rank: Optional[int]):
    """(axis, C, rank, description) that a functional parameterised op maps over, or None."""
    if node.op == "call_function" and node.target in FUNCTION_SOURCES:
        kind, position = FUNCTION_SOURCES[node.target]
        weight = param_value(node_arg(node, position, "weight"), gm, body)
        if weight is None:
            return None
        if kind == "conv":
            spatial = weight.dim() - 2
            rank = rank if rank is not None else spatial + 2  # a convolution's rank is known without shapes
            transposed = node.target in TRANSPOSED_CONVS or (node.target is CONVOLUTION and node.args[6])
            return rank - spatial - 1, None if transposed else weight.shape[0], rank, None
        if kind == "last_norm":
            normalized = node_arg(node, 1, "normalized_shape")
            return (-1, normalized[0], rank, None) if len(normalized) == 1 else None
        if kind == "prelu":
            return (1, weight.numel(), rank, None) if weight.numel() > 1 else None
        dim, size = {"linear": (-1, weight.shape[0]), "channel_norm": (1, weight.shape[0]),
                     "addmm": (-1, weight.shape[-1])}[kind]
        return dim, size, rank, None
    if _is_grouped_matmul(node) and len(node.args) >= 2:
        weight = param_value(node.args[1], gm, body)
        if weight is not None and weight.dim() >= 2:
            return -1, weight.shape[-1], rank, f"grouped matmul by parameter `{_param_name(node.args[1])}`"
    if op_kind(node, gm) == "matmul" and len(node.args) >= 2:
        right, left = param_value(node.args[1], gm, body), param_value(node.args[0], gm, body)
        if right is not None and right.dim() >= 2:
            return -1, right.shape[-1], rank, f"matmul by parameter `{_param_name(node.args[1])}`"
        if left is not None and left.dim() >= 2:
            return -2, left.shape[-2], rank, f"matmul by parameter `{_param_name(node.args[0])}`"
    if node.target in SCALES:
        for arg in node.args[:2]:
            value = param_value(arg, gm, body)
            wide = [i for i, size in enumerate(value.shape) if size != 1] if value is not None else []
            if len(wide) == 1:  # a per-channel scale or shift (layer scale)
                what = f"{_op_name(node)} by parameter `{_param_name(arg)}` {list(value.shape)}"
                return wide[0] - value.dim(), value.shape[wide[0]], rank, what
    return None


def _is_grouped_matmul(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name in GROUPED_MATMULS
    return target in GROUPED_MATMUL_FUNCTIONS


def _param_name(arg: fx.Node) -> str:
    while arg.op not in ("get_attr", "placeholder") and arg.all_input_nodes:
        arg = arg.all_input_nodes[0]
    return str(arg.target)


def _op_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    if isinstance(node.target, str):
        return node.target
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._opname
    return getattr(node.target, "__name__", str(node.target))


def _where(node: fx.Node) -> str:
    if node.op == "call_module":
        return node.target
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return stack[-1][0] if stack else node.name


def source_axis(node: fx.Node, gm: fx.GraphModule, body: set) -> Optional[Axis]:
    """The axis ``node``'s output is mapped over by ``node`` itself, when it is a parameterised op with one."""
    shape = shape_of(node)
    rank = len(shape) if shape is not None else None
    if node.op == "call_module":
        found = _module_source(gm.get_submodule(node.target), rank)
    elif node.op in ("call_function", "call_method"):
        found = _function_source(node, gm, body, rank)
    else:
        found = None
    if found is None:
        return None
    dim, size, rank, what = found
    if rank is not None:
        dim %= rank
        if isinstance(shape[dim] if shape is not None else None, int):
            size = shape[dim]
    last = dim == -1 or (rank is not None and dim == rank - 1)
    axis = "its last axis" if last else f"axis {dim}"
    origin = f"{what or f'{_op_name(node)} `{_where(node)}`'} maps over {axis}"
    return Axis(dim, rank, size, origin)


def _combine(states: list[State], where: str) -> State:
    """One state from several: axes must agree (else a conflict); a conflict beats an axis, an axis a loss."""
    conflicts = [s for s in states if isinstance(s, Lost) and s.conflict]
    if conflicts:
        return conflicts[0]
    axes = [s for s in states if isinstance(s, Axis)]
    for other in axes[1:]:
        if not axes[0].same_place(other):
            return Lost(f"{where} gets axis {axes[0].dim} ({axes[0].origin}) and axis {other.dim} ({other.origin})",
                        conflict=True)
    if axes:
        return axes[0]
    return next((s for s in states if isinstance(s, Lost)), None)


def _undecided(site: ResidualSite, reason: str) -> None:
    site.channel_dim, site.channels, site.channel_reason = None, None, reason


def locate_channel_axis(site: ResidualSite, gm: fx.GraphModule) -> None:
    """Set ``site.channel_dim``, ``site.channels`` and ``site.channel_reason`` from what the branch computes.

    Args:
        site: a site found by ``find_residual_sites`` (its ``body`` and ``branch_outputs`` are set).
        gm: the graph module holding it.
    Returns:
        None. ``channel_dim`` is ``-1`` when the channels are the stream's last axis, else their axis counted
        from the front; ``channel_dim`` and ``channels`` stay None when the axis cannot be decided, and
        ``channel_reason`` says why (or, when decided, which op and which moves decided it).
    """
    body = set(site.body)
    states: dict[fx.Node, State] = {}
    for node in site.body:  # graph order: a node's inputs come first
        source = source_axis(node, gm, body)
        if source is not None:  # the last parameterised op wins over whatever reached it
            states[node] = source
            continue
        moved = [move_axis(node, src, states[src], gm) if isinstance(states.get(src), Axis) else states.get(src)
                 for src in node.all_input_nodes]
        states[node] = _combine(moved, f"`{node.name}`")
    final = _combine([states.get(out) for out in site.branch_outputs], "the add")
    if final is None:
        return _undecided(site, "no parameterised op of the branch maps over a single axis of the stream")
    if isinstance(final, Lost):
        return _undecided(site, final.reason)
    shape = shape_of(site.stream)
    if shape is not None and final.rank is not None and final.rank != len(shape):
        return _undecided(site, f"{final.origin}, but the branch's output has {final.rank} axes and the stream "
                                f"{len(shape)}")
    rank = len(shape) if shape is not None else final.rank
    dim = final.dim % rank if rank is not None else final.dim
    size = shape[dim] if shape is not None else final.size
    path = f"; followed through {', '.join(final.via)}" if final.via else ""
    if size is None:
        return _undecided(site, f"{final.origin}{path}, but its size is unknown without shapes: pass example_inputs")
    if not is_concrete_int(size):
        return _undecided(site, f"{final.origin}{path}, but that axis of the stream has a dynamic size ({size})")
    site.channel_dim = -1 if rank is not None and dim == rank - 1 else dim
    site.channels = int(size)
    stream = f"axis {dim} of the stream {list(shape)}" if shape is not None else f"axis {site.channel_dim}"
    without = "" if shape is not None else " (no shapes: traced without example_inputs; C read off the parameters)"
    site.channel_reason = f"{stream}: {final.origin}{path}{without}"
