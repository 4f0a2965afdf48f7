"""Stream diagnostics of a converted model: the mean mHC maps per site and the Amax gain across depth.

Amax gain (the paper's stability metric, §3.1): for a composite residual map ``P = H_res^(l) ··· H_res^(1)``,
the forward gain is the largest absolute row sum of ``P`` (worst-case growth of the streams going forward) and
the backward gain the largest absolute column sum (the same for gradients going back). Doubly-stochastic maps
give exactly 1; the paper reports about 1.6 for mHC and about 3000 for unconstrained HC at 27B.

The maps are averaged over every token of the batch before composing (the paper's Fig. 8 shows token-averaged
matrices; its text leaves this open).
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

from ..passes.sites import SiteInfo
from ..region import region_call, region_state
from ..trace import flatten_inputs


def amax_gain(matrix: torch.Tensor) -> tuple[float, float]:
    """``(forward, backward)`` Amax gain of one map ``[n, n]``: max absolute row sum, max absolute column sum.

    Example:
        >>> amax_gain(torch.full((4, 4), 0.25))
        (1.0, 1.0)
    """
    m = matrix.double().abs()
    return m.sum(dim=-1).max().item(), m.sum(dim=-2).max().item()


def composite_gains(maps: list[torch.Tensor]) -> dict[str, list[float]]:
    """Gains of the composite residual maps of one chain, ``maps`` in depth order (``H_res^(1)`` first).

    Returns:
        ``forward[l]``: forward gain of ``H^(l+1) ··· H^(1)`` (the stream after l+1 layers);
        ``backward[l]``: backward gain of ``H^(L) ··· H^(l+1)`` (the gradient reaching layer l+1 from the top).
    """
    forward, backward = [], []
    prefix = torch.eye(maps[0].shape[-1], dtype=torch.float64)
    for m in maps:
        prefix = m.double() @ prefix
        forward.append(amax_gain(prefix)[0])
    suffix = torch.eye(maps[0].shape[-1], dtype=torch.float64)
    for m in reversed(maps):
        suffix = suffix @ m.double()
        backward.append(amax_gain(suffix)[1])
    return {"forward": forward, "backward": backward[::-1]}


@dataclass
class SiteMaps:
    """Token-averaged maps of one site: ``h_pre [n]``, ``h_post [n]``, ``h_res [n, n]``."""

    index: int
    module_path: str
    chain: int
    h_pre: torch.Tensor
    h_post: torch.Tensor
    h_res: torch.Tensor


@dataclass
class StreamDiagnostics:
    """What :func:`stream_diagnostics` measured: the maps of every site, and the gains of every chain."""

    sites: list[SiteMaps]
    gains: dict[int, dict[str, list[float]]] = field(default_factory=dict)

    def max_gain(self) -> tuple[float, float]:
        """The largest forward and backward gain of any composite map, over all chains and depths."""
        return (max(max(g["forward"]) for g in self.gains.values()),
                max(max(g["backward"]) for g in self.gains.values()))

    def to_dict(self) -> dict[str, Any]:
        forward, backward = self.max_gain()
        return {
            "sites": [{**asdict(s), "h_pre": s.h_pre.tolist(), "h_post": s.h_post.tolist(), "h_res": s.h_res.tolist()}
                      for s in self.sites],
            "gains": {str(chain): g for chain, g in self.gains.items()},
            "max_amax_forward": forward,
            "max_amax_backward": backward,
        }


def _coefficient_nodes(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """``mhc::coefficients`` node -> the site's parameter prefix (``mhc.<key>``), read off its bias input."""
    found = {}
    for node in gm.graph.nodes:
        if node.target in (torch.ops.mhc.coefficients.default, torch.ops.mhc.coefficients_permutations.default):
            bias = node.args[3]
            found[node] = bias.target.rsplit(".", 1)[0]
    return found


class _MapRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.owner = _coefficient_nodes(gm)
        self.maps: dict[str, dict[str, list[torch.Tensor]]] = {}

    def run_node(self, node):
        out = super().run_node(node)
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.owner:
            name = ("h_pre", "h_post", "h_res")[node.args[1]]
            self.maps.setdefault(self.owner[node.args[0]], {}).setdefault(name, []).append(out.detach())
        return out


@torch.no_grad()
def stream_diagnostics(gm: fx.GraphModule, *args, **kwargs) -> StreamDiagnostics:
    """Run a converted model on a batch and collect its mean mHC maps and Amax gains.

    Args:
        gm: a model returned by :func:`mhc_rewrite.convert`.
        *args, **kwargs: a batch of inputs, as for ``gm(*args, **kwargs)``.
    Returns:
        :class:`StreamDiagnostics`: per site the token-averaged ``H_pre``, ``H_post``, ``H_res``; per chain the
        forward and backward Amax gain of the composite map at every depth.

    Example:
        >>> diag = stream_diagnostics(converted, input_ids)
        >>> diag.max_gain()
    """
    sites: list[SiteInfo] = getattr(gm, "mhc_sites", None)
    if not sites:
        raise ValueError("stream_diagnostics needs a model returned by mhc_rewrite.convert (it has no mhc_sites)")
    prefix = ""
    if isinstance(gm, fx.GraphModule):
        graph, inputs = gm, flatten_inputs(gm, args, kwargs)
    else:  # a converted model: the graph its region runs for these inputs
        region, graph, inputs = region_call(gm, args, kwargs)
        path = region_state(region).path
        prefix = path + "." if path else ""
    recorder = _MapRecorder(graph)
    recorder.run(*inputs)
    result = StreamDiagnostics(sites=[])
    for site in sites:
        maps = recorder.maps[site.param_name.removeprefix(prefix)]
        mean = {k: torch.stack([v.double().reshape(-1, *v.shape[-(2 if k == "h_res" else 1):]).mean(0)
                                for v in maps[k]]).mean(0) for k in maps}
        result.sites.append(SiteMaps(site.index, site.module_path, site.chain, mean["h_pre"], mean["h_post"],
                                     mean["h_res"]))
    for chain in sorted({s.chain for s in result.sites}):
        result.gains[chain] = composite_gains([s.h_res for s in result.sites if s.chain == chain])
    return result
