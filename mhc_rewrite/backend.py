"""The ``mhc`` torch.compile backend, and ``mhc_rewrite.compile``.

``torch.compile(model, backend="mhc")`` (found by name through the ``torch_dynamo_backends`` entry point):

- on a converted model (its graph holds ``torch.ops.mhc`` ops): lowers them to the fused Triton ops
  (``passes/lower_fused.py``) and compiles with Inductor;
- on an unconverted model with grad enabled: refuses. Parameters created inside a backend belong to one compiled
  graph: ``model.parameters()``, the optimizer, ``state_dict``, DDP/FSDP and checkpoints never see them, and every
  recompile would create them afresh. Training that way would silently train without mHC. Convert first
  (``model = mhc_rewrite.convert(model)``) or use ``mhc_rewrite.compile(model, n=4)``, which does both;
- on an unconverted model with grad disabled (inference): rewrites the Dynamo graph with identity-initialised mHC
  (the same function, for measuring the cost or looking at the graph) and warns that the new parameters are
  throwaway.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import fx, nn

from .config import MHCConfig
from .convert import convert
from .errors import MHCRewriteError
from .passes.nodes import is_mhc_op
from .pipeline import lower
from .region import region_call
from .trace import split_example_inputs


def mhc_backend(gm: fx.GraphModule, example_inputs: list, **kwargs) -> Any:
    """The ``mhc`` backend: lower the mHC ops of a converted model to fused kernels, then compile with Inductor.

    Args:
        gm: the Dynamo graph.  example_inputs: its inputs (parameters included).
        **kwargs: ``options`` of ``torch.compile`` are passed on to Inductor.
    """
    from torch._inductor.compile_fx import compile_fx

    if not any(is_mhc_op(node) for node in gm.graph.nodes):
        if torch.is_grad_enabled():
            raise MHCRewriteError(
                "torch.compile(backend='mhc') got a model without mHC while gradients are enabled. Parameters "
                "created inside a compiler backend are invisible to model.parameters(), the optimizer and "
                "state_dict, so training would run without mHC. Convert first: model = mhc_rewrite.convert(model), "
                "then torch.compile(model, backend='mhc'); or use mhc_rewrite.compile(model, n=4)."
            )
        warnings.warn("torch.compile(backend='mhc') on an unconverted model under no_grad: rewriting the compiled "
                      "graph with identity-initialised mHC whose parameters are not part of your model (for "
                      "inference and measurement only)", stacklevel=2)
        for node, value in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs):
            if isinstance(value, nn.Parameter):
                node.meta["mhc_parameter"] = True  # Dynamo passes module parameters as graph inputs
        converted = convert(gm, example_inputs=tuple(example_inputs))
        if converted is not gm:
            gm = converted
    lower(gm)
    return compile_fx(gm, example_inputs, config_patches=kwargs.get("options"))


def compile(
    model: nn.Module,
    n: Optional[int] = None,
    *,
    example_inputs: Any = None,
    config: Optional[MHCConfig] = None,
    compile_options: Optional[dict] = None,
    **options,
) -> nn.Module:
    """Convert ``model`` to mHC, then ``torch.compile`` it with the ``mhc`` backend.

    The new parameters belong to the returned module: pass ``compiled.parameters()`` to the optimizer. With
    ``example_inputs``, the converted region's graph for the current mode is traced before compiling; a call in
    another mode (``.eval()``) traces its graph on first use, which Dynamo sees as a graph break (an error under
    ``fullgraph=True``: call :func:`mhc_rewrite.converted_graph` with inputs in that mode first).

    Args:
        model, n, example_inputs, config, **options: as for :func:`mhc_rewrite.convert`.
        compile_options: keyword arguments for ``torch.compile`` (``fullgraph``, ``dynamic``, ``mode``, ...).
    Returns:
        The compiled converted module.

    Example:
        >>> model = mhc_rewrite.compile(model, n=4, compile_options={"fullgraph": True})
        >>> opt = torch.optim.AdamW(model.parameters())
    """
    converted = convert(model, n, example_inputs=example_inputs, config=config, **options)
    if example_inputs is not None and converted is not model:
        args, kwargs = split_example_inputs(example_inputs)
        region_call(converted, args, kwargs)  # trace this mode's graph now: a trace inside Dynamo is a graph break
    return torch.compile(converted, backend=mhc_backend, **(compile_options or {}))
