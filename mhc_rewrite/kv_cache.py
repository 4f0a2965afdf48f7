"""Key-value caches across a traced graph: a converted region decodes with the caller's cache.

A cache (transformers' ``DynamicCache``, ``StaticCache``, ``EncoderDecoderCache``...) is a Python object that
attention mutates in place; ``torch.export`` cannot take it as an input. mHC needs nothing of the past (its maps
are per token), so the region keeps the cache out of the graph this way:

- the cache's tensors (every layer's keys and values) enter the graph as a flat list of inputs
  (``mhc_cache_tensors``), whose sequence sizes stay free: one graph serves every decoding step;
- while tracing, the region runs on a *copy* of the cache holding the traced tensors: attention reads and
  updates the copy with the cache's own code, and every ``update(...)`` call it makes is recorded; the graph returns
  what those calls were given (the new keys and values of the step);
- after the graph has run, the same ``update`` calls are replayed on the caller's cache, so its own Python (grow
  by concatenation, keep a sliding window, write in place into a static buffer, count the tokens) fills it
  exactly as the original model would; plain attributes the region set besides (``EncoderDecoderCache.is_updated``)
  are set too. A cache the graph writes into in place (``StaticCache``: its buffers and token counter, written back
  by the unlifted export) is given to the graph as clones, so that the replayed ``update`` is the only write.

The specialisation key holds the cache's layout: its classes, which tensors are present, and its plain attributes
(``is_initialized``, a sliding window's size). Prefill (an empty cache) and decoding (a filled one) are two
specialisations. A *counter*, a plain int attribute that the cache's own ``update`` changes (a sliding-window layer's
``cumulative_length``, the tokens it has seen), would make every decoding step its own specialisation: a traced
call learns the counters it saw change (:attr:`CachePlan.counters`), and from then on a counter holding 2 or more
enters the graph as a symbolic int (``mhc_cache_counts``), not as a constant of the key. torch.export keeps the
decisions the model's Python makes on it (a window filled or not) as the range of values the graph is valid for,
which the region checks at every call (``specialisation.sizes_match``): a window that fills up costs a few traces
(a ``DynamicCache``'s sliding layer: inside the window, the two steps at its edge where its slice to the last
``window - 1`` tokens starts to cut, past it), not one per token. A counter holding 0 or 1 stays in the key
(export would fix it to its value anyway), so a prefill graph traced before the counters were known keeps its key.

Chosen over registering the cache classes as pytrees (``transformers.integrations.executorch``): that needs one
flatten/unflatten per cache class, registered globally, and rebuilds the cache from its tensors alone (losing
what is not a tensor); replaying the cache's own ``update`` works for every class that follows transformers'
``Cache.update`` contract and leaves the caller's object what it would be after the original's call.
"""

from __future__ import annotations

import copy
from typing import Any, Hashable, Optional

import torch
import torch.utils._pytree as pytree

CACHE_INPUT = "mhc_cache_tensors"  # the keyword under which a cache's tensors enter a traced graph
COUNTS_INPUT = "mhc_cache_counts"  # the keyword of its counters (ints the graph takes as symbolic values)
_PLAIN = (bool, int, float, str, type(None))
_SEQUENCE = 2  # the sequence dimension of a cache's 4-d keys and values: [batch, heads, sequence, head_dim]
_FROM_GRAPH = object()  # in a recorded update call: a tensor the graph returns


def is_cache(value: Any) -> bool:
    """A key-value cache object: a transformers ``Cache`` (by its protocol, without importing transformers)."""
    return not isinstance(value, torch.Tensor) and hasattr(value, "get_seq_length") and hasattr(value, "update")


def _is_part(value: Any) -> bool:
    """Objects the cache walk descends into: the cache, its sub-caches and its layers."""
    name = type(value).__name__
    return hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, torch.nn.Module, type)) and (
        name.endswith("Cache") or name.endswith("Layer"))


def _walk(obj: Any, path: tuple, parts: list) -> None:
    """``parts``: ``(path, object)`` for ``obj`` and every cache/layer object below it, depth first."""
    parts.append((path, obj))
    for name, value in obj.__dict__.items():
        children = value if isinstance(value, (list, tuple)) else [value]
        for i, child in enumerate(children):
            if _is_part(child):
                _walk(child, path + ((name, i if isinstance(value, (list, tuple)) else None),), parts)


def cache_parts(cache: Any) -> list:
    parts: list = []
    _walk(cache, (), parts)
    return parts


def _plain(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(v, _PLAIN) for v in value.values())
    return isinstance(value, _PLAIN)


def _counter(obj: Any, name: str, value: Any, counters: frozenset) -> bool:
    """``obj.name`` enters the graph as a symbolic int: a learned counter holding 2 or more."""
    return type(value) is int and value > 1 and (type(obj).__qualname__, name) in counters


def cache_layout(cache: Any, counters: frozenset = frozenset()) -> tuple[Hashable, list[torch.Tensor], list[int]]:
    """The cache's specialisation key, its tensors and its counters' values (see the module docstring), in the
    order the traced graph takes them. ``counters``: ``(class qualname, attribute)`` of the known counters."""
    layout, tensors, counts = [], [], []
    for path, obj in cache_parts(cache):
        fields = []
        for name, value in obj.__dict__.items():
            if isinstance(value, torch.Tensor):
                fields.append((name, "tensor"))
                tensors.append(value)
            elif _counter(obj, name, value, counters):
                fields.append((name, "count"))
                counts.append(value)
            elif _plain(value):
                fields.append((name, tuple(sorted(value.items())) if isinstance(value, dict) else value))
        layout.append((path, type(obj).__qualname__, tuple(fields)))
    return tuple(layout), tensors, counts


def _sequence(t: torch.Tensor, dim: int) -> bool:
    """``dim`` is the sequence dimension of a cache's 4-d keys or values."""
    return t.dim() == 4 and dim == _SEQUENCE


def tensors_key(tensors: list[torch.Tensor]) -> Hashable:
    """The cache tensors' part of the specialisation key: dtype, device, rank, contiguity and which sizes are 1, but
    not whether the sequence holds one token (:func:`dynamic_shapes` keeps that size free even at 1)."""
    return tuple((t.dtype, t.device.type, t.dim(), t.is_contiguous(),
                  tuple(size == 1 for d, size in enumerate(t.shape) if not _sequence(t, d)))
                 for t in tensors)


def dynamic_shapes(tensors: list[torch.Tensor], counts: list[int]) -> dict:
    """torch.export's ``dynamic_shapes`` of a cache's inputs: every size of the tensors free but those that are 1,
    except the sequence, free at one token too (the first decoding step of an encoder-decoder, or after a one-token
    prompt, reads a one-token cache: fixed, it would be a graph of its own); the counters free.

    A size that is 1 when traced stays free only where export treats sizes "size-obliviously" (as if not 1, the way
    ``torch.onnx`` exports): the region exports a call with a cache so. No broadcast reads a cache's sequence."""
    return {CACHE_INPUT: [{d: torch.export.Dim.AUTO for d in range(t.dim())
                           if t.shape[d] != 1 or _sequence(t, d)} for t in tensors],
            COUNTS_INPUT: [torch.export.Dim.AUTO for _ in counts]}


def _resolve(root: Any, path: tuple) -> Any:
    obj = root
    for name, index in path:
        obj = getattr(obj, name) if index is None else getattr(obj, name)[index]
    return obj


def _copy_tree(cache: Any, tensors: list, counts: list, counters: frozenset) -> tuple[Any, list]:
    """A copy of ``cache`` (its cache/layer objects, their lists and dicts copied) holding ``tensors`` and ``counts``
    in place of its own tensors and counters, in :func:`cache_layout`'s order; returns the copy and its parts."""
    feed, count_feed = iter(tensors), iter(counts)
    copies: dict[tuple, Any] = {}
    for path, original in cache_parts(cache):
        obj = copies[path] = copy.copy(original)
        for name, value in list(obj.__dict__.items()):
            if isinstance(value, torch.Tensor):
                obj.__dict__[name] = next(feed)
            elif _counter(original, name, value, counters):
                obj.__dict__[name] = next(count_feed)
            elif isinstance(value, (dict, list, tuple)):
                obj.__dict__[name] = list(value) if isinstance(value, tuple) else copy.copy(value)
        if path:
            (name, index), parent = path[-1], copies[path[:-1]]
            if index is None:
                parent.__dict__[name] = obj
            else:
                parent.__dict__[name][index] = obj
    for path, original in cache_parts(cache):  # tuples stay tuples
        for name, value in original.__dict__.items():
            if isinstance(value, tuple):
                copies[path].__dict__[name] = tuple(copies[path].__dict__[name])
    root = copies[()]
    return root, cache_parts(root)


class UpdateRecorder:
    """Records the ``update`` calls attention makes on a traced copy of a cache (the outermost call only: a
    ``Cache.update`` that forwards to its layer's ``update`` is one call)."""

    def __init__(self):
        self.calls: list[tuple[tuple, Any]] = []  # (path of the updated object, (args, kwargs))
        self._depth = 0

    def watch(self, root: Any) -> None:
        for path, obj in cache_parts(root):
            if hasattr(obj, "update") and type(obj).__name__.endswith("Cache"):
                obj.update = self._recording(path, type(obj).update.__get__(obj))  # this copy only

    def _recording(self, path: tuple, update):
        def recorded(*args, **kwargs):
            if self._depth == 0:
                self.calls.append((path, (args, kwargs)))
            self._depth += 1
            try:
                return update(*args, **kwargs)
            finally:
                self._depth -= 1
        return recorded


def _plain_state(parts: list) -> dict:
    return {(path, name): copy.copy(value) for path, obj in parts for name, value in obj.__dict__.items()
            if name != "update" and _plain(value)}


class CachePlan:
    """What one traced graph must do to the caller's cache after it has run: replay the recorded ``update`` calls
    (their tensors are the graph's last outputs) and set the plain attributes the traced call changed."""

    def __init__(self):
        self.specs: list[tuple[tuple, Any]] = []  # (path, treespec of (args, kwargs))
        self.assigned: dict = {}  # (path, attribute) -> value after the call
        self.output_key: Optional[str] = None  # where the region's output held the cache
        self.output_class: Optional[type] = None  # the region's output class (a ModelOutput), None for a tuple
        self.mutated: Optional[set[int]] = None  # cache tensors the graph writes into in place (set at first run)
        self.counters: set[tuple[str, str]] = set()  # (class qualname, attribute): plain ints the call changed

    def record(self, recorder: UpdateRecorder, before: dict, parts: list) -> list:
        """Fill the plan from a traced call; returns the recorded calls' tensors (the graph's extra outputs)."""
        self.specs, leaves_out = [], []  # export may run the forward more than once
        for path, call in recorder.calls:
            leaves, spec = pytree.tree_flatten(call)
            tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
            constants = [_FROM_GRAPH if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
            self.specs.append((path, spec, constants))
            leaves_out.extend(tensors)
        after = _plain_state(parts)
        self.assigned = {key: value for key, value in after.items() if before.get(key, object()) != value
                         and not _symbolic(value)}
        self.counters = set()  # ints the call changed: to a new int, or (the prefill's) to a symbolic value
        for path, obj in parts:
            for name, value in obj.__dict__.items():
                old = before.get((path, name))
                if type(old) is int and (isinstance(value, torch.SymInt) or (type(value) is int and value != old)):
                    self.counters.add((type(obj).__qualname__, name))
        return leaves_out

    def replay(self, cache: Any, tensors: list) -> None:
        feed = iter(tensors)
        for path, spec, constants in self.specs:
            leaves = [next(feed) if c is _FROM_GRAPH else c for c in constants]
            args, kwargs = pytree.tree_unflatten(leaves, spec)
            _resolve(cache, path).update(*args, **kwargs)
        for (path, name), value in self.assigned.items():
            setattr(_resolve(cache, path), name, copy.copy(value))


    def output(self, output: Any, cache: Any) -> Any:
        """The region's output as the original returns it, holding the caller's ``cache``."""
        if self.output_class is not None:
            extra = {} if self.output_key is None else {self.output_key: cache}
            return self.output_class(**output, **extra)
        return tuple(cache if value is None and i == 1 else value for i, value in enumerate(output))


def _symbolic(value: Any) -> bool:
    values = value.values() if isinstance(value, dict) else [value]
    return any(isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) for v in values)


def traced_forward(forward, cache_name: str, cache: Any, plan: CachePlan, counters: frozenset):
    """A forward for ``torch.export``: takes the cache's tensors as ``mhc_cache_tensors``, its counters as
    ``mhc_cache_counts`` and the call's other keywords, runs ``forward`` on a copy of ``cache`` holding them, and
    returns ``(output without the cache, tensors of the recorded update calls)``. Fills ``plan`` as it runs."""

    def forward_with_cache(**kwargs):
        tensors, counts = kwargs.pop(CACHE_INPUT), kwargs.pop(COUNTS_INPUT)
        copied, parts = _copy_tree(cache, tensors, counts, counters)
        recorder = UpdateRecorder()
        recorder.watch(copied)
        before = _plain_state(parts)
        output = forward(**kwargs, **{cache_name: copied})
        updates = plan.record(recorder, before, parts)
        if isinstance(output, dict):  # a ModelOutput: a plain dict without the cache copy, rebuilt by the caller
            plan.output_class = type(output)
            plan.output_key = next((key for key, value in output.items() if value is copied), None)
            output = {key: value for key, value in output.items() if value is not copied}
        elif isinstance(output, tuple):
            output = tuple(None if value is copied else value for value in output)
        return output, updates

    return forward_with_cache
