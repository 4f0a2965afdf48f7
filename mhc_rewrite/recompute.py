"""Recompute the n-stream activations in backward instead of storing them (the paper's §4.3.2).

Every site saves its input streams ``X_l`` (n·C per token) for backward. Inside ``recompute_streams``, a stream
is kept only at segment starts (every ``every``-th site of a chain, and the chain's expanded head); the streams in
between are saved as a recipe, ``X_{l+1} = post_res_mix(X_l, f_l, H_post_l, H_res_l)``, whose inputs the post-mix
saves anyway, and rebuilt from the segment start when backward first needs them (then cached until that segment's
backward is done). Branch activations are untouched: only the mHC stream ops are replayed, without ``F``.

    with mhc_rewrite.recompute_streams(model):      # forward inside, backward anywhere after
        loss = loss_fn(model(x))
    loss.backward()

It works in eager mode (a ``TorchFunctionMode`` sees the ``torch.ops.mhc`` calls, and saved-tensor hooks swap the
streams for recipes); under ``torch.compile`` the graph is traced ahead of time and the mode does not apply.
The default segment is the paper's optimum ``sqrt(n·L / (n + 2))`` for chains of ``L`` sites.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_mhc = torch.ops.mhc
_HEADS = {_mhc.expand_streams.default}
_MIXES = {_mhc.post_res_mix.default, _mhc.fused_post_res_mix.default}


class _Stream:
    """One n-stream tensor of the forward: kept (a segment start) or rebuilt from its parent on demand."""

    __slots__ = ("kept", "parent", "op", "inputs", "depth", "cache", "__weakref__")

    def __init__(self, depth, kept=None, parent=None, op=None, inputs=()):
        self.kept, self.parent, self.op, self.inputs, self.depth, self.cache = kept, parent, op, inputs, depth, None

    def materialize(self) -> torch.Tensor:
        if self.kept is not None:
            return self.kept
        if self.cache is None:
            with torch.no_grad():  # the op that made it (reference or fused kernel): bit-identical
                self.cache = self.op(self.parent.materialize(), *self.inputs)
        return self.cache


class _StorageTally:
    """The bytes of the unique storages of the tensors it is shown."""

    def __init__(self):
        self._storages: dict[int, int] = {}

    def add(self, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        self._storages[key] = tensor.untyped_storage().nbytes()

    @property
    def total(self) -> int:
        return sum(self._storages.values())


class count_saved_bytes:
    """Context manager: what a forward inside it saves for backward (``kept_bytes``), stored as usual.

    The baseline to compare :class:`recompute_streams` with; both count unique storages the same way.
    """

    def __enter__(self):
        self._tally = _StorageTally()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    def _pack(self, tensor):
        self._tally.add(tensor)
        return tensor

    @property
    def kept_bytes(self) -> int:
        return self._tally.total


def default_segment(model: nn.Module) -> int:
    """The paper's segment length sqrt(n·L/(n+2)) for the longest chain of a converted model."""
    sites = getattr(model, "mhc_sites", None)
    if not sites:
        raise ValueError("recompute_streams needs a model returned by mhc_rewrite.convert (or pass every=)")
    n = model.mhc_config.n
    longest = max(sum(s.chain == chain for s in sites) for chain in {s.chain for s in sites})
    return max(1, round(math.sqrt(n * longest / (n + 2))))


class recompute_streams(TorchFunctionMode):
    """Context manager: forward passes inside it store only every ``every``-th stream tensor for backward.

    Args:
        model: the converted model (used for the default segment length).
        every: keep one stream tensor per this many sites (default: the paper's optimum).
    Attributes:
        kept_bytes: bytes of the tensors the forward saved for backward (unique storages), for measurement.
    """

    def __init__(self, model: Optional[nn.Module] = None, every: Optional[int] = None):
        super().__init__()
        self.every = every if every is not None else default_segment(model)
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")
        self._streams: dict[int, tuple[weakref.ref, _Stream]] = {}
        self._kept = _StorageTally()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def kept_bytes(self) -> int:
        return self._kept.total

    def __enter__(self):
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._streams.clear()
        return self._hooks.__exit__(*exc)

    def _lookup(self, tensor) -> Optional[_Stream]:
        entry = self._streams.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _register(self, tensor: torch.Tensor, stream: _Stream) -> None:
        self._streams[id(tensor)] = (weakref.ref(tensor), stream)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _HEADS:
            self._register(out, _Stream(0, kept=out))
        elif func in _MIXES:
            parent = self._lookup(args[0])
            depth = 0 if parent is None else parent.depth + 1
            if parent is None or depth % self.every == 0:
                self._register(out, _Stream(depth, kept=out))
            else:
                inputs = tuple(a.detach() for a in args[1:4])
                self._register(out, _Stream(depth, parent=parent, op=func, inputs=inputs))
        return out

    def _pack(self, tensor):
        stream = self._lookup(tensor)
        if stream is not None and stream.kept is None:
            return stream  # a recipe instead of n·C per token
        self._kept.add(tensor)
        return tensor

    @staticmethod
    def _unpack(packed):
        return packed.materialize() if isinstance(packed, _Stream) else packed
