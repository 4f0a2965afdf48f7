"""Specialisations: what a traced graph of a converted region was traced for, and the key it is cached under.

A trace is a specialisation. ``torch.fx.symbolic_trace`` and ``torch.export`` both run the model's Python once
and keep only the tensor operations: every decision the Python made is baked into the graph. So a graph may
only run a later call that would make the same decisions. The key of a call holds everything the original
model may decide on in Python:

- every public plain-valued attribute (bool, number, string, None) of every module of the region: the
  train/eval flag (``nn.Dropout``, ``x if self.training else ...``, DropPath, BatchNorm), Hugging Face's
  ``gradient_checkpointing``, a dropout's ``p``, a user's ``use_checkpoint`` switch;
- grad mode and autocast;
- the call signature: which arguments are given, by position or keyword, the value of every non-tensor argument
  (``None``, bools, ints, strings), and for tensors their dtype, device, rank and which sizes are 1 (export
  specialises size-1 dimensions) and whether they are contiguous;
- which tensor inputs are the same object (``labels=input_ids`` is traced as one input).

``torch.export`` may also fix a size it could not keep free, and narrows a symbolic int input (a cache's token
count, ``kv_cache.py``) to the range its guards allow; both are read off the exported graph and checked at every
call (:func:`static_sizes`, :func:`sizes_match`), and so are the exported graph's own guards
(:func:`guards_hold`). Parameters and buffers replaced by
``.to()``/``.half()``/``to_empty()`` clear the cache (the region's ``_apply``), so no graph holds a stale tensor.
"""

from __future__ import annotations

from typing import Any, Hashable

import sympy
import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch import fx, nn

from .errors import MHCRewriteError

_CONSTANTS = (bool, int, float, str, torch.dtype, torch.device)


def _value_key(value: Any, tensors: list[torch.Tensor], where: str) -> Hashable:
    if isinstance(value, torch.Tensor):
        alias = next((i for i, seen in enumerate(tensors) if seen is value), None)
        tensors.append(value)
        # contiguity too: torch.export traced from a strided view guards on its layout (a later contiguous call of
        # another length failed inside the exported module's guard function)
        return ("tensor", value.dtype, value.device.type, value.dim(), tuple(s == 1 for s in value.shape),
                value.is_contiguous(), alias)
    if value is None or isinstance(value, _CONSTANTS):
        return ("const", type(value).__name__, value)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_value_key(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)))
    if isinstance(value, dict):
        return ("dict", tuple((k, _value_key(v, tensors, f"{where}[{k!r}]")) for k, v in value.items()))
    raise MHCRewriteError(
        f"a converted region got {where} of type {type(value).__name__}: a traced graph can only take tensors, "
        "None, numbers, strings and tuples/lists/dicts of them as inputs. Pass that object to the model outside "
        "the converted region, or convert a smaller part of the model (filter_fn)."
    )


def call_key(region: nn.Module, args: tuple, kwargs: dict) -> Hashable:
    """The key a call of ``region`` with ``args``/``kwargs`` is specialised on (see the module docstring)."""
    tensors: list[torch.Tensor] = []
    arg_keys = tuple(_value_key(a, tensors, f"positional argument {i}") for i, a in enumerate(args))
    kwarg_keys = tuple(sorted((k, _value_key(v, tensors, f"argument {k!r}")) for k, v in kwargs.items()))
    # runs at every call (1380 module-dict entries for a 4-layer Llama): a list comprehension testing the name's first
    # character first, 30 % faster than a generator with str.startswith (measured), same entries
    flags = tuple(tuple([(k, v) for k, v in m.__dict__.items() if k[:1] != "_" and
                         (v is None or isinstance(v, _CONSTANTS))]) for m in region.modules())
    grad_mode = (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                 torch.is_autocast_enabled("cuda") if torch.cuda.is_available() else False)
    return (flags, grad_mode, arg_keys, kwarg_keys)


def static_sizes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[tuple, ...]:
    """What an exported graph fixed of its inputs: ``(leaf index, dim, size)`` for every non-symbolic tensor
    dimension, and ``(leaf index, None, (low, high))`` for an int input it took as a symbolic value (a cache's
    counter, ``kv_cache.py``): the range export's guards left it (a bound None: unbounded).

    The unlifted module of ``torch.export`` takes its inputs flattened as ``pytree.tree_flatten((args, kwargs))``,
    one placeholder per leaf, in order; a dimension whose fake value is a plain int was specialised.
    """
    leaves = pytree.tree_leaves((args, kwargs))
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(leaves):
        return ()
    fixed = []
    for i, (leaf, node) in enumerate(zip(leaves, placeholders)):
        val = node.meta.get("val")
        if isinstance(leaf, torch.Tensor) and isinstance(val, torch.Tensor):
            fixed.extend((i, d, int(s)) for d, s in enumerate(val.shape) if isinstance(s, int))
        elif isinstance(val, torch.SymInt):
            bounds = val.node.shape_env.bound_sympy(val.node.expr)
            fixed.append((i, None, tuple(int(b) if isinstance(b, sympy.Integer) else None  # None: unbounded
                                         for b in (bounds.lower, bounds.upper))))
    return tuple(fixed)


def sizes_match(fixed: tuple[tuple, ...], args: tuple, kwargs: dict) -> bool:
    """True when the call's inputs have every size ``fixed`` (see :func:`static_sizes`) requires."""
    if not fixed:
        return True
    leaves = pytree.tree_leaves((args, kwargs))
    for i, d, size in fixed:
        if i >= len(leaves):
            return False
        if d is None:
            low, high = size
            value = leaves[i]
            if not (isinstance(value, int) and (low is None or low <= value) and (high is None or value <= high)):
                return False
        elif leaves[i].shape[d] != size:
            return False
    return True


def guards_hold(gm: fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    """True when an exported graph's own guards accept the call: torch.export's ``_guards_fn`` (the ranges of its
    symbolic sizes and ints, and the relations between them, e.g. ``n != 4`` where a slice ``x[n - 4:]`` was traced as
    not starting at 0), which the graph would otherwise raise on. Checked before the graph runs, so that a call
    outside them traces again instead of failing; graphs without guards (symbolic traces) hold for every call their
    key matches."""
    guards = getattr(gm, "_guards_fn", None)
    if guards is None or getattr(gm, "_in_spec", None) is None:
        return True
    try:
        guards(*fx_pytree.tree_flatten_spec((list(args), kwargs), gm._in_spec))
    except AssertionError:
        return False
    return True
