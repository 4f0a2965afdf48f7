"""How one axis of a tensor moves through an op: the rules ``channel_axis`` follows from a branch's last
parameterised op to the residual add.

An axis is followed by **position**, never matched by size: ``permute``, ``transpose``, ``movedim`` and indexing
say where each input axis goes; a reshape (``view``, ``flatten``, ``unflatten``, ``squeeze``, ...) keeps an axis
when some output axis has the same size *and* the same product of sizes before it, or after it (row-major order
is what every reshape preserves), and loses it when the reshape merges or splits it. So a stream whose channel count
equals its height (``[B, 8, 8, 8]``) is followed as surely as any other. Ops without a rule are treated as
elementwise with broadcasting: the axis keeps its place counted from the end, provided the output has the
same size there. Without shapes (a graph traced without example inputs) only the rules that need no shape
apply; the others lose the axis, and say that shapes are needed.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten = torch.ops.aten
F = nn.functional


@dataclass(frozen=True)
class Axis:
    """An axis of one node's output that a parameterised op maps over.

    Attributes:
        dim: its position: ``0 <= dim < rank`` when ``rank`` is known, else as the op gave it (``-1``: last).
        rank: the number of dims of the tensor, when known.
        size: its size, when known (from the shape, or from the parameter when there are no shapes).
        origin: the parameterised op that maps over it, as users read it (``Linear `blocks.0.fc2```).
        via: the ops that moved it since (permutes, transposes, reshapes, ...), by node name.
    """

    dim: int
    rank: Optional[int]
    size: Optional[int]
    origin: str
    via: tuple[str, ...] = ()

    def same_place(self, other: "Axis") -> bool:
        rank = self.rank if self.rank is not None else other.rank
        if rank is None:
            return self.dim == other.dim
        return self.dim % rank == other.dim % rank


@dataclass(frozen=True)
class Lost:
    """The axis cannot be followed (or two paths disagree): ``reason`` says where and why."""

    reason: str
    conflict: bool = False


State = Union[Axis, Lost, None]  # None: this value carries no parameterised op's axis


def resolve_aten(*names: str) -> set:
    """The aten overloads named ``"view.default"``, ... that this torch has."""
    found = set()
    for name in names:
        packet, overload = name.split(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            found.add(op)
    return found


def _kinds(table: dict[str, set]) -> dict:
    return {target: kind for kind, targets in table.items() for target in targets}


# op -> rule name; every op not listed follows the elementwise (broadcasting) rule
FUNCTION_KINDS = _kinds({
    "permute": {torch.permute} | resolve_aten("permute.default"),
    "transpose": {torch.transpose, torch.swapaxes, torch.swapdims} | resolve_aten("transpose.int", "swapaxes.default"),
    "t": {torch.t} | resolve_aten("t.default"),
    "movedim": {torch.movedim, torch.moveaxis} | resolve_aten("movedim.int", "movedim.intlist"),
    "reshape": {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}
    | resolve_aten("view.default", "reshape.default", "_unsafe_view.default", "unsqueeze.default", "squeeze.dim",
               "squeeze.dims", "squeeze.default", "flatten.using_ints", "unflatten.int", "view_copy.default"),
    "getitem": {operator.getitem},
    "same_rank": {torch.cat, torch.concat, torch.concatenate, torch.split, torch.chunk, torch.tensor_split}
    | resolve_aten("cat.default", "slice.Tensor", "split.Tensor", "split_with_sizes.default", "chunk.default"),
    "select": {torch.select, torch.unbind} | resolve_aten("select.int", "unbind.int"),
    "stack": {torch.stack} | resolve_aten("stack.default"),
    "matmul": {torch.matmul, torch.mm, torch.bmm, operator.matmul} | resolve_aten("matmul.default", "mm.default",
                                                                             "bmm.default"),
    "attention": {F.scaled_dot_product_attention}
    | resolve_aten("scaled_dot_product_attention.default", "_scaled_dot_product_flash_attention_for_cpu.default",
               "_scaled_dot_product_efficient_attention.default", "_scaled_dot_product_flash_attention.default"),
    "einsum": {torch.einsum} | resolve_aten("einsum.default"),
    "reduce": {torch.sum, torch.mean, torch.amax, torch.amin}
    | resolve_aten("sum.dim_IntList", "mean.dim", "amax.default", "amin.default"),
    "getattr": {builtins.getattr},
})
METHOD_KINDS = {
    "permute": "permute", "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose", "t": "t",
    "movedim": "movedim", "moveaxis": "movedim", "split": "same_rank", "chunk": "same_rank",
    "tensor_split": "same_rank", "select": "select", "unbind": "select", "matmul": "matmul", "mm": "matmul",
    "bmm": "matmul", "sum": "reduce", "mean": "reduce", "amax": "reduce", "amin": "reduce",
    **{name: "reshape" for name in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
                                    "reshape_as")},
    **{name: "not_a_tensor" for name in ("size", "dim", "numel", "stride", "item", "tolist")},
}
_SIZE_CHANGING = {"same_rank"}  # without shapes, the axis's size is unknown after these (cat, split, slice)


def op_kind(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_function":
        return FUNCTION_KINDS.get(node.target, "elementwise")
    if node.op == "call_method":
        return METHOD_KINDS.get(node.target, "elementwise")
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Flatten, nn.Unflatten)):
        return "reshape"
    return "elementwise"


def shape_of(node) -> Optional[tuple]:
    """The shape of ``node``'s value (of its first tensor when it returns several), when the trace has it."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, (tuple, list)):
        val = next((v for v in val if isinstance(v, torch.Tensor)), None)
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _equal(a, b) -> bool:
    return statically_known_true(a == b)


def node_arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _int_list(node: fx.Node, start: int, name: str) -> Optional[list]:
    """Dims given as varargs (``x.permute(0, 2, 1)``) or as one list (``torch.permute(x, [0, 2, 1])``)."""
    rest = node.args[start:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return list(rest[0])
    if rest:
        return list(rest)
    value = node.kwargs.get(name)
    return [value] if isinstance(value, int) else (list(value) if value is not None else None)


# Each rule: (node, src, dim, rank, in_shape, out_shape) -> (new dim, new rank) | Lost | None (src is no data input).
# ``dim`` is non-negative when ``rank`` is known.


def _needs_rank(node: fx.Node) -> Lost:
    return Lost(f"`{node.name}` cannot be followed without shapes (pass example_inputs)")


def _permute(node, src, dim, rank, *_):
    dims = _int_list(node, 1, "dims")
    if src is not node.args[0] or dims is None:
        return None
    rank = len(dims)
    return [d % rank for d in dims].index(dim % rank), rank


def _transpose(node, src, dim, rank, *_):
    if src is not node.args[0]:
        return None
    a, b = node_arg(node, 1, "dim0"), node_arg(node, 2, "dim1")
    if rank is not None:
        a, b = a % rank, b % rank
    elif not (a < 0 and b < 0 and dim < 0) and not (a >= 0 and b >= 0 and dim >= 0):
        return _needs_rank(node)
    return (b if dim == a else a if dim == b else dim), rank


def _t(node, src, dim, rank, *_):
    if rank == 1:
        return dim, rank
    return {0: 1, 1: 0, -1: -2, -2: -1}[dim], rank


def _getattr(node, src, dim, rank, *_):
    name = node.args[1]
    if name in ("mT", "mH"):
        if rank is None and dim >= 0:
            return _needs_rank(node)
        last = (rank or 0) - 1
        swap = {last: last - 1, last - 1: last} if rank is not None else {-1: -2, -2: -1}
        return swap.get(dim, dim), rank
    if name in ("T", "H"):
        return (rank - 1 - dim, rank) if rank is not None else _needs_rank(node)
    return None  # .shape, .dtype, ...: not a tensor


def _movedim(node, src, dim, rank, *_):
    if src is not node.args[0]:
        return None
    if rank is None:
        return _needs_rank(node)
    sources, targets = node_arg(node, 1, "source"), node_arg(node, 2, "destination")
    sources = [s % rank for s in (sources if isinstance(sources, (list, tuple)) else [sources])]
    targets = [t % rank for t in (targets if isinstance(targets, (list, tuple)) else [targets])]
    order: list = [None] * rank
    for s, t in zip(sources, targets):
        order[t] = s
    rest = iter(i for i in range(rank) if i not in sources)
    order = [o if o is not None else next(rest) for o in order]
    return order.index(dim), rank


def _reshape(node, src, dim, rank, in_shape, out_shape):
    if src is not node.args[0]:
        return None
    if in_shape is None or out_shape is None:
        return _needs_rank(node)
    before, size, after = math.prod(in_shape[:dim]), in_shape[dim], math.prod(in_shape[dim + 1:])
    # the sizes before the axis, or those after it, multiply to the same (a reshape keeps the element count, so
    # either implies the other): a window partition `[B*W, S, C] -> [B*W, s, S/s, C]` keeps its last axis even where
    # the symbolic sizes before it are too involved for the products to be compared
    hits = [b for b in range(len(out_shape)) if _equal(out_shape[b], size)
            and (_equal(math.prod(out_shape[b + 1:]), after) or _equal(math.prod(out_shape[:b]), before))]
    if len(hits) == 1:
        return hits[0], len(out_shape)
    why = "merges or splits it" if not hits else "leaves it ambiguous (axes of size 1)"
    return Lost(f"`{node.name}` reshapes {list(in_shape)} to {list(out_shape)}, which {why}")


def _getitem(node, src, dim, rank, in_shape, out_shape):
    if src is not node.args[0]:
        return None
    val = src.meta.get("val")
    index = node.args[1]
    if isinstance(val, (tuple, list)) or (val is None and isinstance(index, int) and dim < 0):
        return dim, rank  # one output of a multi-output op (attention, split, norms), or x[i] counted from the end
    if rank is None:
        return _needs_rank(node)
    items = index if isinstance(index, tuple) else (index,)
    used = sum(i is not None and i is not Ellipsis for i in items)
    spread: list = []
    for item in items:
        spread.extend([slice(None)] * (rank - used) if item is Ellipsis else [item])
    spread.extend([slice(None)] * (rank - sum(i is not None for i in spread)))
    if any(_is_tensor_index(i) for i in spread):
        return _tensor_index(node, dim, rank, spread, out_shape)
    out, position = 0, 0
    for item in spread:
        if item is None:
            out += 1
            continue
        if position == dim:
            if not isinstance(item, slice):
                return Lost(f"`{node.name}` selects one index of the axis")
            if item != slice(None) and out_shape is None:
                return Lost(f"`{node.name}` slices the axis: its size needs shapes (pass example_inputs)")
            break
        out, position = out + isinstance(item, slice), position + 1
    return out, len(out_shape) if out_shape is not None else None


def _is_tensor_index(item) -> bool:
    return isinstance(item, (list, torch.Tensor)) or isinstance(shape_of(item), tuple)


def _tensor_index(node, dim, rank, spread, out_shape):
    """``x[idx]``, ``x[idx, :]`` (gathering tokens for MoE experts, un-permuting them): an axis after every index,
    with only full slices from it to the end, keeps its place counted from the end (the indices' axes replace the
    indexed ones in front of it). Boolean masks, and indices after the axis, lose it."""
    positions, items = [], [item for item in spread if item is not None]
    for position, item in enumerate(items):
        if _is_tensor_index(item):
            val = item.meta.get("val") if isinstance(item, fx.Node) else None
            if not isinstance(item, fx.Node) or not isinstance(val, torch.Tensor) or val.dtype == torch.bool:
                return Lost(f"`{node.name}` indexes with a boolean mask or a tensor of unknown kind")
            positions.append(position)
    if None in spread or out_shape is None or any(p >= dim for p in positions) or any(
            item != slice(None) for item in items[dim:]):
        return Lost(f"`{node.name}` indexes the axis, or axes after it, with a tensor")
    return dim - rank + len(out_shape), len(out_shape)


def _same_rank(node, src, dim, rank, *_):
    return dim, rank  # concatenation, split, chunk, slice: every axis keeps its place


def _select(node, src, dim, rank, *_):
    if src is not node.args[0]:
        return None
    removed = node_arg(node, 1, "dim", 0)
    if rank is None:
        return _needs_rank(node)
    removed %= rank
    if removed == dim:
        return Lost(f"`{node.name}` selects one index of the axis")
    return dim - (removed < dim), rank - 1


def _stack(node, src, dim, rank, *_):
    if rank is None:
        return _needs_rank(node)
    inserted = node_arg(node, 1, "dim", 0) % (rank + 1)
    return dim + (inserted <= dim), rank + 1


def _from_end(dim: int, rank: Optional[int]) -> Optional[int]:
    return dim - rank if rank is not None else (dim if dim < 0 else None)


def _place(from_end: int, out_shape) -> tuple:
    rank = len(out_shape) if out_shape is not None else None
    return (from_end % rank if rank is not None else from_end), rank


def _matmul(node, src, dim, rank, in_shape, out_shape):
    """``a @ b``: a's second-to-last axis and b's last axis survive, batch axes keep their place from the end."""
    d = _from_end(dim, rank)
    if d is None:
        return _needs_rank(node)
    places = set()
    for position, contracted in ((0, -1), (1, -2)):
        if node.args[position] is src:
            if rank is not None and rank < 2:
                return Lost(f"`{node.name}` multiplies by a vector")
            if d == contracted:
                return Lost(f"`{node.name}` sums over the axis (matrix product)")
            places.add(d)
    return _place(places.pop(), out_shape) if len(places) == 1 else Lost(f"`{node.name}` multiplies the axis by itself")


def _attention(node, src, dim, rank, in_shape, out_shape):
    """Scaled dot-product attention ``softmax(q kᵀ) v``: the output is ``[..., Lq, Ev]``."""
    d = _from_end(dim, rank)
    if d is None:
        return _needs_rank(node)
    args = list(node.args[:3]) + [None] * (3 - len(node.args[:3]))
    if src is args[0] and d != -1:
        return _place(d, out_shape)  # query positions and batch axes
    if src is args[2] and d != -2:
        return _place(d, out_shape)  # value features and batch axes
    if src in args:
        return Lost(f"`{node.name}` sums over the axis (attention)")
    return None  # the mask


def _einsum(node, src, dim, rank, in_shape, out_shape):
    equation = node.args[0]
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if "..." in equation or "->" not in equation or rank is None:
        return Lost(f"`{node.name}`: einsum with '...' or an implicit output is not followed")
    inputs, output = equation.replace(" ", "").split("->")
    places = {output.find(spec[dim]) for spec, op in zip(inputs.split(","), operands) if op is src}
    if places == {-1}:
        return Lost(f"`{node.name}` sums over the axis (einsum)")
    return (places.pop(), len(output)) if len(places) == 1 else Lost(f"`{node.name}`: the axis goes two ways")


def _reduce(node, src, dim, rank, in_shape, out_shape):
    if src is not node.args[0]:
        return None
    dims = node_arg(node, 1, "dim")
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    if dims is None or rank is None:
        return Lost(f"`{node.name}` reduces the tensor") if dims is None else _needs_rank(node)
    dims = {d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    if dim in dims:
        return Lost(f"`{node.name}` reduces over the axis")
    return (dim, rank) if keepdim else (dim - sum(d < dim for d in dims), rank - len(dims))


def _elementwise(node, src, dim, rank, in_shape, out_shape):
    """Unary ops, binary ops with broadcasting, softmax, casts, dropout, pooling: the axis keeps its place
    counted from the end, if the output has the same size there."""
    if out_shape is None or in_shape is None:
        return dim, rank  # no shapes: assumed elementwise
    if len(out_shape) < len(in_shape):
        return Lost(f"`{node.name}` drops axes of {list(in_shape)} (to {list(out_shape)})")
    place = dim + len(out_shape) - len(in_shape)
    if not _equal(out_shape[place], in_shape[dim]):
        return Lost(f"`{node.name}` changes the axis's size ({in_shape[dim]} to {out_shape[place]})")
    return place, len(out_shape)


RULES = {"permute": _permute, "transpose": _transpose, "t": _t, "getattr": _getattr, "movedim": _movedim,
         "reshape": _reshape, "getitem": _getitem, "same_rank": _same_rank, "select": _select, "stack": _stack,
         "matmul": _matmul, "attention": _attention, "einsum": _einsum, "reduce": _reduce,
         "not_a_tensor": lambda *_: None, "elementwise": _elementwise}


def move_axis(node: fx.Node, src: fx.Node, axis: Axis, gm: fx.GraphModule) -> State:
    """Where ``axis`` of ``src``'s value is in ``node``'s output.

    Args:
        node: the op.  src: one of its inputs.  axis: an axis of ``src``'s value.  gm: the graph's module.
    Returns:
        The moved ``Axis``; a ``Lost`` saying why it cannot be followed; or None when ``src`` is not data
        that flows into ``node``'s output (a shape argument, an attention mask).
    """
    kind = op_kind(node, gm)
    in_shape, out_shape = shape_of(src), shape_of(node)
    if out_shape is None and node.meta.get("val") is not None:
        return None  # a size, a dtype: not a tensor
    rank = len(in_shape) if in_shape is not None else axis.rank
    dim = axis.dim % rank if rank is not None else axis.dim
    moved = RULES[kind](node, src, dim, rank, in_shape, out_shape)
    if moved is None or isinstance(moved, Lost):
        return moved
    new_dim, new_rank = moved
    if out_shape is not None:
        size = out_shape[new_dim] if isinstance(out_shape[new_dim], int) else None
    else:
        size = None if kind in _SIZE_CHANGING else axis.size
    changed = (new_dim, new_rank) != (dim, rank) or kind in ("reshape", "permute", "transpose", "movedim")
    via = axis.via + (node.name,) if changed and kind != "elementwise" else axis.via
    return Axis(new_dim, new_rank, size, axis.origin, via)
