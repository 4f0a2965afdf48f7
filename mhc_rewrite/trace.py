"""Tracing front-end: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule`` the passes can read.

``torch.fx.symbolic_trace`` first (fast, keeps the module tree, needs no inputs); if it fails, ``torch.export``
(non-strict) with the example inputs, then its unlifted module. With example inputs, a symbolically traced
graph also gets fake values (``node.meta["val"]``), i.e. the shapes and dtypes of every node.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from .errors import TraceError

log = logging.getLogger(__name__)


def split_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``example_inputs`` as ``(args, kwargs)``: a tensor, a tuple/list of args, or a dict of kwargs."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _any_size(value):
    """``dynamic_shapes`` entry letting torch.export decide which dims of an input may vary."""
    if isinstance(value, torch.Tensor):
        return {dim: torch.export.Dim.AUTO for dim in range(value.dim())}
    return None


def _export(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    try:  # batch and sequence sizes stay free where the model allows it
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
        dynamic_shapes = {name: _any_size(value) for name, value in bound.items()}
        program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        log.info("torch.export with free sizes failed (%s); exporting with the example sizes fixed", exc)
        program = torch.export.export(model, args, kwargs, strict=False)
    if any(isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable
           for node in program.graph.nodes):
        program = program.run_decompositions({})  # functionalise: `x += f(x)` becomes an add the finder sees
    return program.module()


def flatten_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The values of ``gm``'s placeholders, in order, for a call ``gm(*args, **kwargs)``.

    A ``torch.export`` module flattens its inputs with its pytree spec; a symbolically traced one has one
    placeholder per argument, keyword inputs matched by name.
    """
    if getattr(gm, "_in_spec", None) is not None:
        return pytree.tree_leaves((args, kwargs))
    names = [node.target for node in gm.graph.nodes if node.op == "placeholder"]
    return list(args) + [kwargs[name] for name in names[len(args):] if name in kwargs]


def _propagate_fake_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    args = flatten_inputs(gm, args, kwargs)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    try:
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_args)
    except Exception as exc:  # shapes are a help, not a requirement
        log.warning("could not propagate shapes through the traced graph (%s); continuing without them", exc)
        for node in gm.graph.nodes:
            node.meta.pop("val", None)


def trace(model: nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """Trace ``model`` into a new ``GraphModule`` that shares its parameters.

    Args:
        model: an ``nn.Module``, or a ``GraphModule`` (its graph is copied, its parameters shared).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs. Needed when
            ``symbolic_trace`` fails (e.g. Hugging Face models) and to know the shapes of the graph.
    Returns:
        The traced ``GraphModule``.
    Raises:
        TraceError: both tracers failed; the message names both failures.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() takes an nn.Module, got {type(model).__name__}")
    args, kwargs = split_example_inputs(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm = fx.GraphModule(model, copy.deepcopy(model.graph))
        gm.meta.update(getattr(model, "meta", {}))
        if example_inputs is not None and not any("val" in node.meta for node in gm.graph.nodes):
            _propagate_fake_values(gm, args, kwargs)
        return gm
    try:
        gm = fx.symbolic_trace(model)
    except Exception as symbolic_error:
        if example_inputs is None:
            raise TraceError(
                f"torch.fx.symbolic_trace failed on {type(model).__name__} "
                f"({type(symbolic_error).__name__}: {symbolic_error}), and torch.export was not tried because "
                "no example_inputs were given. Pass example_inputs=(tensor, ...) (or a dict of keyword inputs) "
                "so the model can be traced with torch.export."
            ) from symbolic_error
        try:
            return _export(model, args, kwargs)
        except Exception as export_error:
            raise TraceError(
                f"could not trace {type(model).__name__}: torch.fx.symbolic_trace failed "
                f"({type(symbolic_error).__name__}: {symbolic_error}); torch.export (non-strict) with the given "
                f"example_inputs failed ({type(export_error).__name__}: {export_error}). Check that the example "
                "inputs run the model (model(*example_inputs)), or pass an already traced GraphModule."
            ) from export_error
    if example_inputs is not None:
        _propagate_fake_values(gm, args, kwargs)
    return gm
