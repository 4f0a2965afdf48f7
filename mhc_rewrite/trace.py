"""Tracing front-end: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule`` the passes can read.

``torch.fx.symbolic_trace`` first (fast, keeps the module tree, needs no inputs); if it fails, ``torch.export``
(non-strict) with the example inputs, then its unlifted module. With example inputs, a symbolically traced
graph also gets fake values (``node.meta["val"]``), i.e. the shapes and dtypes of every node.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils import _pytree as pytree

from .errors import TraceError
from .kv_cache import CACHE_INPUT, COUNTS_INPUT
from .kv_cache import dynamic_shapes as cache_dynamic_shapes

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


def forward_names(forward) -> tuple[str, ...]:
    """The parameter names of ``forward`` (a function or a bound method), ``self`` left out. Read at every call of a
    converted model, so cached per function (inspect is slow; a bound method is cached by its function, never by the
    instance). A plain dict, not ``functools.lru_cache``: Dynamo, tracing a converted model, warns at each compile
    that it steps around an lru_cache wrapper, and reads a dict entry as a constant."""
    function = getattr(forward, "__func__", forward)
    names = _PARAMETER_NAMES.get(function)
    if names is None:
        if len(_PARAMETER_NAMES) >= 256:  # bounded, as the lru_cache was: functions made per instance cannot pile up
            _PARAMETER_NAMES.clear()
        names = _PARAMETER_NAMES[function] = tuple(name for name in inspect.signature(function).parameters
                                                   if name != "self")
    return names


_PARAMETER_NAMES: dict = {}  # function -> its parameter names (functions of model classes: a handful per process)


def without_cache(forward, args: tuple, kwargs: dict, *, keywords: bool = False) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a call of ``forward`` with ``use_cache=False`` where it takes that argument: a key-value
    cache is mutated in place by attention and cannot cross a traced graph. The positional arguments become
    keywords when one is given at or after ``use_cache``, or always with ``keywords=True``."""
    names = forward_names(forward)
    if "use_cache" not in names:
        return args, kwargs
    if keywords or names.index("use_cache") < len(args):
        args, kwargs = (), {**dict(zip(names, args)), **kwargs}
    return args, {**kwargs, "use_cache": False}


@contextmanager
def caches_off(model: nn.Module):
    """While tracing ``model``: every Hugging Face config below it (a module's ``.config`` with ``use_cache``) says
    ``use_cache=False``, restored afterwards. :func:`without_cache` reaches a ``use_cache`` argument of the traced
    forward itself; this reaches the Hugging Face model inside a wrapper (PEFT's ``PeftModel`` / ``LoraModel``, whose
    ``forward(*args, **kwargs)`` has no such argument) and a model that takes ``use_cache`` only through ``**kwargs``
    (GraniteMoe's causal LM): a call that leaves it ``None`` reads the config, and a cache made there would reach the
    output, where torch.export refuses it."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "use_cache")}
    saved = {key: config.use_cache for key, config in configs.items()}
    try:
        for config in configs.values():
            config.use_cache = False
        yield
    finally:
        for key, config in configs.items():
            config.use_cache = saved[key]


def _any_size(value):
    """``dynamic_shapes`` entry letting torch.export decide which dims of an input may vary. It mirrors the input's
    pytree (a list of a cache's tensors, empty for an empty cache; a ``ModelOutput`` of encoder states, whose entry
    export wants as the list of its children) with, at each tensor, its dims of size other than 1 marked
    ``Dim.AUTO`` (export specialises size 1 anyway)."""
    if isinstance(value, torch.Tensor):
        return {dim: torch.export.Dim.AUTO for dim in range(value.dim()) if value.shape[dim] != 1}
    if type(value) in (list, tuple):
        return type(value)(_any_size(v) for v in value)
    if type(value) is dict:
        return {k: _any_size(v) for k, v in value.items()}
    node = pytree.SUPPORTED_NODES.get(type(value))
    if node is None:
        return None
    return [_any_size(child) for child in node.flatten_fn(value)[0]]


def _export(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    try:  # batch and sequence sizes stay free where the model allows it
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
        dynamic_shapes = {name: _any_size(value) for name, value in bound.items()}
        oblivious = contextlib.nullcontext()
        if CACHE_INPUT in bound:  # a call with a key-value cache (kv_cache.py)
            dynamic_shapes.update(cache_dynamic_shapes(bound[CACHE_INPUT], bound[COUNTS_INPUT]))
            oblivious = fx_config.patch(backed_size_oblivious=True)
        with oblivious:
            program = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        log.info("torch.export with free sizes failed (%s); exporting with the example sizes fixed", exc)
        program = torch.export.export(model, args, kwargs, strict=False)
    if any(isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable
           for node in program.graph.nodes):
        program = program.run_decompositions({})  # functionalise: `x += f(x)` becomes an add the finder sees
    gm = program.module()
    _differentiable_copies(gm)
    _snapshot_mutated_buffers(gm)
    return gm


def _differentiable_copies(gm: fx.GraphModule) -> None:
    """Functionalisation writes ``dst[..., :k] = src`` as ``aten.copy(dst_slice, src)`` and a ``slice_scatter``;
    autograd has no derivative for the functional ``aten.copy`` (DeepseekV3's attention fails at its first
    backward). Its value is ``src`` broadcast to ``dst``'s shape in ``dst``'s dtype and device: written so, with
    ops autograd knows, in place in ``gm``."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.target is not torch.ops.aten.copy.default or "val" not in node.args[0].meta:
            continue
        dst, src = node.args[:2]
        like = dst.meta["val"]
        with gm.graph.inserting_before(node):
            wide = gm.graph.call_function(torch.ops.aten.expand_as.default, (src, dst))
            value = gm.graph.call_function(torch.ops.aten._to_copy.default, (wide,),
                                           {"dtype": like.dtype, "device": like.device})
        value.meta = dict(node.meta)
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _snapshot_mutated_buffers(gm: fx.GraphModule) -> None:
    """An exported training graph reads a buffer (BatchNorm's ``running_mean``), then writes its new value back at the
    end with ``copy_(buffer, new)``. A reader that autograd saves for backward (``_native_batch_norm_legit_functional``
    saves its running statistics) then finds the buffer one version further at ``backward()``: "modified by an inplace
    operation". Eager code never meets this (the op updates the buffer itself, before autograd saves it). So every
    reader of a buffer written in place reads a clone taken where the graph reads it (the value before the write, as
    in the original); the write still goes to the buffer. In place in ``gm``; graphs without such writes are left."""
    written = {node.args[0] for node in gm.graph.nodes
               if node.target is torch.ops.aten.copy_.default and node.args[0].op == "get_attr"}
    for buffer in written:
        readers = [user for user in buffer.users if user.target is not torch.ops.aten.copy_.default]
        if not readers:
            continue
        with gm.graph.inserting_after(buffer):
            snapshot = gm.graph.call_function(torch.ops.aten.clone.default, (buffer,))
        if "val" in buffer.meta:
            snapshot.meta["val"] = buffer.meta["val"]
        for reader in readers:
            reader.replace_input_with(buffer, snapshot)
    if written:
        gm.graph.lint()
        gm.recompile()


@contextmanager
def _buffers_kept(module: nn.Module):
    """Shape propagation runs the model's leaf modules: undo what they write into buffers (BatchNorm's
    ``num_batches_tracked += 1`` runs for real even under a fake-tensor mode)."""
    saved = [(buf, buf.clone()) for buf in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def flatten_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The values of ``gm``'s placeholders, in order, for a call ``gm(*args, **kwargs)``.

    A ``torch.export`` module flattens its inputs with its pytree spec; a symbolically traced one has one
    placeholder per argument, keyword inputs matched by name.
    """
    if getattr(gm, "_in_spec", None) is not None:
        return pytree.tree_leaves((args, kwargs))
    names = [node.target for node in gm.graph.nodes if node.op == "placeholder"]
    return list(args) + [kwargs[name] for name in names[len(args):] if name in kwargs]


def _fake_inputs(values) -> list:
    """Fake copies of the example inputs, with their sizes, in a mode that has a shape environment: an op whose
    output size depends on the data (``torch.where(mask)``, ``nonzero``: a Python loop over MoE experts) then gets
    a symbolic size instead of stopping the propagation."""
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    return mode, [mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) else v for v in values]


def thread_in_place(gm: fx.GraphModule) -> None:
    """Make in-place method calls of a symbolic trace visible in its dataflow, in place.

    ``symbolic_trace`` records ``out.index_add_(0, idx, y)`` as a node whose result nobody reads (the code goes on
    reading ``out``), so the finder cannot see that ``y`` reaches the output, and dead-code elimination would drop
    the call. An in-place method returns its ``self``: every later reader of ``out`` reads the call instead (the
    same tensor at run time). ``torch.export`` graphs need none of this (they are functionalised).
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if (node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")
                and node.args and isinstance(node.args[0], fx.Node)):
            target = node.args[0]
            target.replace_all_uses_with(node, delete_user_cb=lambda user: order[user] > order[node])
    gm.graph.lint()
    gm.recompile()


def _propagate_fake_values(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    mode, fake_args = _fake_inputs(flatten_inputs(gm, args, kwargs))
    try:
        with _buffers_kept(gm):
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
        raise TypeError(f"trace() takes an nn.Module, got {type(model).__name__}")
    args, kwargs = split_example_inputs(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm = fx.GraphModule(model, copy.deepcopy(model.graph))
        gm.meta.update(getattr(model, "meta", {}))
        if example_inputs is not None and not any("val" in node.meta for node in gm.graph.nodes):
            _propagate_fake_values(gm, args, kwargs)
        return gm
    try:
        gm = fx.symbolic_trace(model)
        thread_in_place(gm)
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


def _holds_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value))


class _WatchingTracer(fx.Tracer):
    """A symbolic tracer that shows a recorder (``watch(module)``, ``tag(node)``) every leaf-module call and
    every node it creates (see ``mhc_rewrite/checkpointing.py``)."""

    def __init__(self, recorder=None):
        super().__init__()
        self.recorder = recorder

    def call_module(self, m, forward, args, kwargs):
        if self.recorder is not None and self.is_leaf_module(m, self.path_of_module(m)):
            self.recorder.watch(m)
        return super().call_module(m, forward, args, kwargs)

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if self.recorder is not None:
            self.recorder.tag(node)
        return node


def _symbolic_trace_call(model: nn.Module, args: tuple, kwargs: dict, recorder) -> Optional[fx.GraphModule]:
    """``symbolic_trace`` specialised on this call: tensors become inputs, every other argument a constant."""
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None  # torch.fx cannot trace a forward taking *args/**kwargs
    try:
        bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    values = dict(list(bound.arguments.items())[1:])
    concrete = {name: v for name, v in values.items() if not isinstance(v, torch.Tensor)}
    if any(_holds_tensor(v) for v in concrete.values()):
        return None  # tensors inside containers would be baked in as constants
    try:
        tracer = _WatchingTracer(recorder)
        graph = tracer.trace(model, concrete_args=concrete or None)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        thread_in_place(gm)
    except Exception as exc:
        log.info("symbolic_trace of %s failed (%s); using torch.export", type(model).__name__, exc)
        return None
    mode, fake = _fake_inputs(values.values())
    try:
        with _buffers_kept(gm):
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake)  # placeholders: the signature's order
    except Exception as exc:  # shapes are a help, not a requirement (as for the analysis trace)
        log.warning("could not propagate shapes through the traced graph (%s); continuing without them", exc)
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
    gm.meta["mhc_call"] = "positional"  # call with every argument by position (fx renames specialised ones)
    return gm


def trace_call(model: nn.Module, args: tuple, kwargs: dict, recorder=None) -> fx.GraphModule:
    """Trace ``model`` for one call (a specialisation): ``symbolic_trace`` with the non-tensor arguments as
    constants, else ``torch.export`` (non-strict) with these inputs. Shapes are propagated in both cases.
    ``recorder`` (a ``CheckpointRecorder``) is shown the leaf-module calls and new nodes of the symbolic tracer.

    Raises:
        TraceError: neither tracer could trace the call.
    """
    gm = _symbolic_trace_call(model, args, kwargs, recorder)
    if gm is not None:
        return gm
    try:
        return _export(model, args, kwargs)
    except Exception as exc:
        raise TraceError(f"could not trace {type(model).__name__} for this call: torch.export failed "
                         f"({type(exc).__name__}: {exc})") from exc
