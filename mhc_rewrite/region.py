"""The converted region: the part of the user's model whose residuals became mHC, re-traced per specialisation.

This module is the runtime of a converted model: ``convert`` installs a region once (:func:`install`); everything
else here runs at the model's calls (find the graph of the call, or trace the region with ``trace.trace_call`` and
rewrite it with ``pipeline.rewrite_call``).

``convert(model)`` returns a shallow copy of the user's model (same class, parameters shared) in which the
smallest module holding every rewritten residual chain, the *region* (``model.model`` for a Hugging Face causal
LM, the model itself for a plain PyTorch model), becomes an instance of a subclass of its own class (the way
``torch.nn.utils.parametrize`` does it). That subclass:

- holds the mHC parameters as an ordinary child, ``<region>.mhc.<site key>``: ``parameters()``, ``state_dict``,
  optimizers, DDP/FSDP and checkpoints see them from the start;
- runs every call through a graph traced and rewritten for that call's specialisation
  (``mhc_rewrite/specialisation.py``): a call that leaves the specialisation a graph was traced for (train/eval,
  other keyword inputs, aliasing, a size export fixed, another dtype after ``.to()``) traces again, so a stale
  graph never runs. All graphs share the one set of mHC parameters.
- keeps everything outside the region — loss, ``generate``, ``save_pretrained``, the config — the user's code.

Key-value caches: a call in eval mode with a cache, or asking for one, runs with it (:func:`_run_cached`): the
cache's tensors are graph inputs and its own ``update`` calls are replayed on it after the graph
(``mhc_rewrite/kv_cache.py``). Training calls run without a cache: ``use_cache`` is forced off and an empty cache
object is dropped (a filled one is an error).
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Hashable, Optional

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensor

from .checkpointing import checkpoint_units, record_checkpoints
from .config import MHCConfig
from .errors import MHCRewriteError, TraceError
from .kv_cache import CACHE_INPUT, COUNTS_INPUT, CachePlan, cache_layout, is_cache, tensors_key, traced_forward
from .paths import absolute
from .pipeline import lower as lower_graph
from .pipeline import rewrite_call
from .sharding import unit_hooks_off, units_gathered
from .specialisation import call_key, guards_hold, sizes_match, static_sizes
from .trace import flatten_inputs, forward_names, trace_call, without_cache

log = logging.getLogger(__name__)


@dataclass
class RegionState:
    """What a converted region remembers: the options, and its graphs (never pickled: re-traced on demand)."""

    config: MHCConfig
    path: str  # the region's module path in the converted model ("" for the root)
    graphs: dict[Hashable, list] = field(default_factory=dict)  # key -> [(fixed sizes, GraphModule)]
    traces: int = 0
    trace_seconds: float = 0.0
    last: Optional[fx.GraphModule] = None  # the graph of the latest call, for the inspect views
    lowered: bool = False  # fused Triton ops instead of the reference ops (lower(), passes/lower_fused.py)
    sites: list = field(default_factory=list)  # the converted model's SiteInfo records, rewritten then skipped
    skipped: list = field(default_factory=list)
    skipped_keys: set = field(default_factory=set)  # the site keys skipped at conversion: they stay skipped
    cacheless: set = field(default_factory=set)  # keys of calls with a cache that could not be traced with it
    counters: frozenset = frozenset()  # (class, attribute) of the caches' counters seen so far (kv_cache.py)
    generates: bool = False  # the converted model generates (HF can_generate()): asked for a cache, it makes one

    def __getstate__(self):
        state = dict(self.__dict__)
        state["graphs"], state["last"] = {}, None
        return state


_STATE = "_mhc_state"  # the key of a region's RegionState in its __dict__ (outside nn.Module's registries)
_CLASSES: dict[type, type] = {}


def converted_class(base: type) -> type:
    """The converted-region subclass of ``base`` (one per class, created on first use)."""
    if base not in _CLASSES:
        _CLASSES[base] = type(f"MHC{base.__name__}", (ConvertedRegion, base), {"__module__": base.__module__})
    return _CLASSES[base]


def _new_region(base: type) -> nn.Module:
    """Unpickling: an empty instance of ``base``'s converted subclass (pickle then restores its ``__dict__``)."""
    cls = converted_class(base)
    return cls.__new__(cls)


def region_base(cls: type) -> type:
    """The user's class under a converted region's class (also when another wrapper, e.g. FSDP2's ``FSDP<Cls>``,
    has subclassed it in turn)."""
    for klass in cls.__mro__:
        if klass.__bases__[:1] == (ConvertedRegion,):
            return klass.__bases__[1]
    raise TypeError(f"{cls.__name__} is not a converted region's class")


@contextmanager
def original_module(region: "ConvertedRegion"):
    """``region`` as the user's class, without its ``mhc`` child, while a tracer runs its original ``forward``."""
    cls, params = region.__class__, region._modules.pop("mhc")
    region.__class__ = region_base(cls)  # (an FSDP2 wrapper class too: its hooks already ran for this call)
    try:
        yield region
    finally:
        region.__class__ = cls
        region._modules["mhc"] = params


def _drop_cache(region: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Run without a key-value cache: ``use_cache=False`` where the forward takes it; empty caches dropped."""
    args, kwargs = without_cache(region_base(type(region)).forward, args, kwargs)
    for name, value in list(kwargs.items()):
        if value is not None and hasattr(value, "get_seq_length"):  # a transformers Cache
            if value.get_seq_length() != 0:
                raise MHCRewriteError(
                    f"a converted model got a filled key-value cache ({type(value).__name__} as {name!r}) in a call "
                    f"that runs without one (train mode={region.training}, or use_cache=False): a converted model "
                    "decodes with a cache in eval mode; call model.eval() or leave the cache out."
                )
            kwargs[name] = None
    return args, kwargs


def _cache_call(region: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[dict, str, object]]:
    """``(keywords, cache keyword, cache)`` for a call that runs with a key-value cache, else None (the call runs
    without one, :func:`_drop_cache`). A call carries a cache when it passes one, or, in eval mode, when it asks for
    one (``use_cache``, or the model's ``config.use_cache``) and the converted model generates (Hugging Face's
    ``can_generate()``; it is given a ``DynamicCache``, an ``EncoderDecoderCache`` of two for an encoder-decoder, as
    the original makes; an encoder such as BERT makes none).
    Training calls keep running without a cache."""
    names = forward_names(region_base(type(region)).forward)
    kwargs = {**dict(zip(names, args)), **kwargs}
    found = [(name, value) for name, value in kwargs.items() if is_cache(value)]
    config = getattr(region, "config", None)
    use_cache = kwargs.get("use_cache")
    use_cache = getattr(config, "use_cache", False) if use_cache is None else use_cache
    if region.training or not use_cache:
        return None
    if found:
        return kwargs, *found[0]
    name = next((n for n in ("cache", "past_key_values") if n in names), None)
    if name is None or config is None or not region_state(region).generates:
        return None
    from transformers import DynamicCache, EncoderDecoderCache  # a Hugging Face model: transformers is there

    if getattr(config, "is_encoder_decoder", False):
        return kwargs, name, EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    return kwargs, name, DynamicCache(config=config)


@contextmanager
def _cache_forward(region: nn.Module, kwargs: dict, cache):
    """While tracing a call with a cache: the region's ``forward`` (this instance's, for the tracer) takes the cache's
    tensors and runs the original forward on a copy of the cache (``kv_cache.traced_forward``)."""
    if cache is None:
        yield
        return
    name, obj, plan, counters = cache
    forward = traced_forward(type(region).forward.__get__(region), name, obj, plan, counters)
    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in kwargs])  # export binds by name
    region.__dict__["forward"] = forward
    try:
        yield
    finally:
        del region.__dict__["forward"]


_WITHOUT_CACHE = object()  # _run_cached: this call runs without a cache (the region could not be traced with it)


def _mutated_inputs(gm: fx.GraphModule, call: dict, tensors: list) -> set[int]:
    """Indices of the cache tensors ``gm`` writes into in place (``copy_`` into its placeholder, as the unlifted
    export writes input mutations back), e.g. a ``StaticCache``'s buffers and token counter."""
    leaves = pytree.tree_leaves(((), call))
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    written = {node.args[0] for node in gm.graph.nodes if node.op == "call_function" and node.args
               and node.target in (torch.ops.aten.copy_.default, torch.Tensor.copy_)}
    index = {id(t): i for i, t in enumerate(tensors)}
    return {index[id(leaf)] for leaf, node in zip(leaves, placeholders) if node in written and id(leaf) in index}


def _known_graph(state: RegionState, key: Hashable, args: tuple, kwargs: dict) -> Optional[fx.GraphModule]:
    """The graph traced for ``key`` whose fixed sizes and export guards accept this call, or None."""
    # `in` and `[]`, not dict.get: Dynamo of torch 2.11 cannot trace dict.get here, breaks the graph and recompiles
    # the rest at every step (seen on a GPU machine whose torch was 2.11)
    for fixed, gm in state.graphs[key] if key in state.graphs else ():
        if sizes_match(fixed, args, kwargs) and guards_hold(gm, args, kwargs):
            return gm
    return None


def _run_cached(region: "ConvertedRegion", kwargs: dict, name: str, cache):
    """Run a call with a key-value cache: the graph of its specialisation (the cache's layout is part of the key),
    then the cache's own ``update`` calls replayed on ``cache`` (``kv_cache.py``)."""
    state = region_state(region)
    layout, tensors, counts = cache_layout(cache, state.counters)
    call = {k: v for k, v in kwargs.items() if k != name}
    # the key: the counters' values are not in it, nor whether the cached sequence holds one token (kv_cache.py)
    key = ("kv_cache", name, layout, tensors_key(tensors), call_key(region, (), call))
    call[CACHE_INPUT], call[COUNTS_INPUT] = tensors, counts
    gm = _known_graph(state, key, (), call)
    if key in state.cacheless:
        return _WITHOUT_CACHE
    if gm is None:
        plan = CachePlan()
        try:
            gm = _build(region, (), call, key, (name, cache, plan, state.counters))
        except TraceError as exc:
            if cache.get_seq_length() != 0:
                raise
            log.warning("%s could not be traced with its %s (%s); it runs without a key-value cache",
                        type(region).__name__, type(cache).__name__, exc)
            state.cacheless.add(key)
            return _WITHOUT_CACHE
        gm.meta["mhc_kv_plan"] = plan
        state.counters = state.counters | plan.counters
    state.last = gm
    plan = gm.meta["mhc_kv_plan"]
    if plan.mutated is None:
        plan.mutated = _mutated_inputs(gm, call, tensors)
    if plan.mutated:  # the graph writes into them (a StaticCache): the replayed update() is the one write
        call[CACHE_INPUT] = [t.clone() if i in plan.mutated else t for i, t in enumerate(tensors)]
    output, updates = gm(**call)
    plan.replay(cache, updates)
    return plan.output(output, cache)


class ConvertedRegion(nn.Module):
    """Mixin placed before the user's class: ``forward`` runs the graph of the call's specialisation."""

    def forward(self, *args, **kwargs):
        with units_gathered(self, torch.is_grad_enabled()):  # FSDP2 per layer: see mhc_rewrite/sharding.py
            return self._mhc_forward(args, kwargs)

    def _mhc_forward(self, args: tuple, kwargs: dict):
        cached = _cache_call(self, args, kwargs)
        if cached is not None:
            output = _run_cached(self, *cached)
            if output is not _WITHOUT_CACHE:
                return output
        args, kwargs = _drop_cache(self, args, kwargs)
        gm = self._mhc_graph_for(args, kwargs)
        if gm.meta.get("mhc_call") == "positional":  # symbolic_trace renames specialised arguments
            return gm(*graph_inputs(self, gm, args, kwargs))
        return gm(*args, **kwargs)

    def _mhc_graph_for(self, args: tuple, kwargs: dict) -> fx.GraphModule:
        state = region_state(self)
        gm = _known_graph(state, call_key(self, args, kwargs), args, kwargs)
        if gm is not None:
            state.last = gm
            return gm
        return _build(self, args, kwargs)  # under torch.compile: a graph break, then the new graph is traced

    def _apply(self, fn, recurse=True):
        region_state(self).graphs.clear()  # .to()/.half()/to_empty() may replace tensors a graph holds
        return super()._apply(fn, recurse)

    def __reduce_ex__(self, protocol):
        state = dict(self.__dict__)
        state[_STATE] = copy.copy(state[_STATE])
        state[_STATE].graphs, state[_STATE].last = {}, None
        return _new_region, (region_base(type(self)),), state

    def __setstate__(self, state):
        nn.Module.__setstate__(self, state)


def _same(tensor):
    return tensor


@contextmanager
def _no_autocast():
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def _specialise(region: "ConvertedRegion", args: tuple, kwargs: dict, cache=None) -> fx.GraphModule:
    """Trace the region's original forward for this call and rewrite it with the region's mHC parameters.
    ``cache``: ``(keyword, cache object, CachePlan, known counters)`` of a call with a key-value cache
    (``kv_cache.py``)."""
    state = region_state(region)
    # The caller's saved-tensor hooks (save_on_cpu, a byte counter) must not see the tracer's fake tensors, and
    # the caller's autocast applies when the graph runs, not while it is traced.
    with original_module(region), torch.autograd.graph.saved_tensors_hooks(_same, _same), _no_autocast(), \
            record_checkpoints(region) as recorder, _cache_forward(region, kwargs, cache), unit_hooks_off(region):
        gm = trace_call(region, args, kwargs, recorder=recorder)
    tags = sorted({n.meta["checkpoint_call"] for n in gm.graph.nodes if "checkpoint_call" in n.meta})
    units = tags or recorder.units  # symbolic traces tag the nodes made inside each checkpoint call
    caller = f"the converted {type(region).__name__} (train={region.training})"
    gm = rewrite_call(gm, region.mhc, state.config, caller, lowered=state.lowered, skipped=state.skipped_keys)
    gm.mhc_sites, gm.mhc_skipped, gm.mhc_config = state.sites, state.skipped, state.config  # as the model's
    if units:  # checkpointed layers stay checkpointed, their mHC ops with them
        gm = checkpoint_units(gm, units)
    if state.path:  # module paths as in the whole model, for the inspect views
        for node in gm.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if stack:
                node.meta["nn_module_stack"] = {k: (absolute(p, state.path), t) for k, (p, t) in stack.items()}
            if "mhc" in node.meta:
                node.meta["mhc"] = {**node.meta["mhc"],
                                    "module_path": absolute(node.meta["mhc"]["module_path"], state.path)}
    return gm


@torch._dynamo.disable
def _build(region: "ConvertedRegion", args: tuple, kwargs: dict, key: Hashable = None, cache=None) -> fx.GraphModule:
    """Trace and rewrite the region for a call it has no graph for, and cache the graph under the call's key.

    Runs eagerly even under ``torch.compile``: a trace needs the real call (a graph break, once per
    specialisation; run the model once in each mode before compiling with ``fullgraph=True``)."""
    state = region_state(region)
    start = time.perf_counter()
    if any(isinstance(leaf, FakeTensor) for leaf in pytree.tree_leaves((args, kwargs))):
        raise MHCRewriteError(
            f"the converted {type(region).__name__} is being traced (torch.export?) for a call it has no graph for "
            f"(train={region.training}); run the converted model once on real inputs of this kind first"
        )
    gm = _specialise(region, args, kwargs, cache)
    seconds = time.perf_counter() - start
    state.traces, state.trace_seconds = state.traces + 1, state.trace_seconds + seconds
    log.info("traced %s for a new specialisation (%d so far, %.2f s)", type(region).__name__, state.traces, seconds)
    key = call_key(region, args, kwargs) if key is None else key
    state.graphs.setdefault(key, []).append((static_sizes(gm, args, kwargs), gm))
    state.last = gm
    return gm


def graph_inputs(region: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The values of ``gm``'s placeholders, in order, for a call ``region(*args, **kwargs)``."""
    if gm.meta.get("mhc_call") == "positional":
        bound = inspect.signature(region_base(type(region)).forward).bind(region, *args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())[1:]
    return flatten_inputs(gm, args, kwargs)


class _Captured(Exception):
    pass


def region_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple["ConvertedRegion", fx.GraphModule, list]:
    """Run ``model`` up to its converted region and return the region, the graph it would run for this call,
    and that graph's inputs (the rest of the model is not run)."""
    region = region_of(model)
    captured = {}

    def capture(module, call_args, call_kwargs):
        captured["call"] = _drop_cache(module, call_args, call_kwargs)
        raise _Captured

    handle = region.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(*args, **kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "call" not in captured:
        raise MHCRewriteError(f"calling {type(model).__name__} with these inputs never reached its converted region")
    call_args, call_kwargs = captured["call"]
    gm = region._mhc_graph_for(call_args, call_kwargs)
    return region, gm, graph_inputs(region, gm, call_args, call_kwargs)


def converted_graph(model: nn.Module, *args, **kwargs) -> fx.GraphModule:
    """The rewritten graph a converted model runs for these inputs in its current mode (for reading and drawing).

    Args:
        model: a model returned by :func:`mhc_rewrite.convert`.
        *args, **kwargs: inputs as for ``model(*args, **kwargs)``; with none, the graph of the latest call.
    Returns:
        A ``GraphModule`` of the converted region; its nodes carry the module paths of the whole model.

    Example:
        >>> print(converted_graph(model, input_ids).code)
    """
    if args or kwargs:
        return region_call(model, args, kwargs)[1]
    last = region_state(model).last
    if last is None:
        raise MHCRewriteError("this converted model has not run yet: pass example inputs to converted_graph()")
    return last


def shallow_clone(model: nn.Module, path: str) -> tuple[nn.Module, nn.Module]:
    """A copy of ``model`` sharing every parameter and module except those on the way to ``path``.

    The modules from the root to ``path`` are copied (same class, own child/parameter/hook registries), so
    swapping the module at ``path`` in the copy leaves the user's model untouched. Returns ``(root, module at
    path)`` of the copy.
    """
    def clone(module: nn.Module) -> nn.Module:
        new = copy.copy(module)
        for name, value in module.__dict__.items():
            if isinstance(value, dict):
                new.__dict__[name] = copy.copy(value)  # _modules, _parameters, _buffers, hook registries
        for name in ("config", "generation_config"):  # Hugging Face: the copy's options are its own
            if name in module.__dict__:
                new.__dict__[name] = copy.deepcopy(module.__dict__[name])
        return new

    root = current = clone(model)
    for name in path.split(".") if path else ():
        child = clone(current._modules[name])
        current._modules[name] = child
        current = child
    return root, current


def install(region: nn.Module, config: MHCConfig, path: str) -> "ConvertedRegion":
    """Make ``region`` (a module of a shallow copy, see :func:`shallow_clone`) a converted region, in place: its
    class becomes the converted subclass of its own, it gets its state and an empty ``mhc`` child for the sites'
    parameters."""
    region.__class__ = converted_class(type(region))
    region.__dict__[_STATE] = RegionState(config, path)
    region.mhc = nn.ModuleDict()
    return region


def lower(model: nn.Module) -> nn.Module:
    """Run a converted model on the fused Triton ops: every graph its region has traced, and every later one,
    gets the ``lower_fused`` pass (reference mHC ops -> fused ``triton_op``s). On CPU tensors the fused ops compute
    their reference, so the lowered model runs everywhere.

    Args:
        model: a model returned by :func:`mhc_rewrite.convert`; changed in place.
    Returns:
        ``model``.

    Example:
        >>> mhc_rewrite.lower(model)
    """
    state = region_state(model)
    state.lowered = True
    for entries in state.graphs.values():
        for _, gm in entries:
            lower_graph(gm)
    return model


def find_region(model: nn.Module) -> Optional["ConvertedRegion"]:
    return next((m for m in model.modules() if isinstance(m, ConvertedRegion)), None)


def region_of(model: nn.Module) -> "ConvertedRegion":
    region = find_region(model)
    if region is None:
        raise MHCRewriteError(f"{type(model).__name__} is not a model returned by mhc_rewrite.convert")
    return region


def region_state(model: nn.Module) -> RegionState:
    """The state of the converted region of ``model`` (a converted model, or the region itself)."""
    region = model if isinstance(model, ConvertedRegion) else region_of(model)
    return region.__dict__[_STATE]
