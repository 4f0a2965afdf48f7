"""FSDP2 units inside a converted region: ``fully_shard`` applied per layer (and at the root) of a converted model.

FSDP2 gathers a unit's parameters in a forward pre-hook of the unit's module and reduce-scatters its gradients
from hooks the pre-hook registers. A converted region runs a graph in which the layers are no longer called as
modules (their leaf modules, or their parameters, are), so those hooks would never fire: the graph would read the
sharded ``DTensor`` shards. Instead the region itself, at each call:

- gathers every FSDP2 unit strictly inside it (``FSDPModule.unshard()``) before the graph is looked up, traced or
  run, so the graph reads the full parameters (in the mixed-precision ``param_dtype``); FSDP2 reuses one unsharded
  parameter per sharded one, so a traced graph stays valid from step to step;
- while the region is being traced, switches those units' forward hooks off (they would reshard, mid-trace, the
  parameters the graph is being built from);
- leaves the units gathered for backward: the root unit's end-of-backward callback runs the post-backward of every
  unit whose hooks did not fire (``FSDPParamGroup.post_backward``: reduce-scatter in ``reduce_dtype``, then
  reshard). Without grad (evaluation) the units are resharded when the call returns.

The cost, stated in README "Distributed": the units of one region are gathered together for the whole step (no
per-layer all-gather overlap, peak memory of the gathered region); parameters, gradients and optimizer state stay
sharded between steps, mHC parameters included.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def _fsdp_module_class():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return None
    return FSDPModule


def inner_units(region: nn.Module) -> list[nn.Module]:
    """The FSDP2 units (modules ``fully_shard`` was applied to) strictly inside ``region``."""
    cls = _fsdp_module_class()
    if cls is None:
        return []
    return [m for m in region.modules() if m is not region and isinstance(m, cls)]


@contextmanager
def units_gathered(region: nn.Module, grad_enabled: bool):
    """Gather the FSDP2 units inside ``region`` for one call (a no-op without any); reshard them on exit only when
    no backward will (``grad_enabled`` False)."""
    units = inner_units(region)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        if not grad_enabled:
            for unit in units:
                unit.reshard()


@contextmanager
def unit_hooks_off(region: nn.Module):
    """The forward hooks of the FSDP2 units inside ``region`` switched off while the region is traced."""
    saved = []
    for unit in inner_units(region):
        saved.append((unit, unit._forward_pre_hooks, unit._forward_hooks))
        unit._forward_pre_hooks, unit._forward_hooks = type(unit._forward_pre_hooks)(), type(unit._forward_hooks)()
    try:
        yield
    finally:
        for unit, pre, post in saved:
            unit._forward_pre_hooks, unit._forward_hooks = pre, post
