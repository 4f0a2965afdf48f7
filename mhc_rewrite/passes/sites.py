"""What the passes find: ``ResidualSite`` (graph-level, holds nodes) and ``SiteInfo`` (a plain record)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import fx


@dataclass(eq=False)
class ResidualSite:
    """One residual ``x + f(x)`` (or ``x + f(x) + g(x)``) in a traced graph.

    Attributes:
        index: position among the sites found, in graph order.
        module_path: the module the branch belongs to, e.g. ``model.layers.3.self_attn``.
        stream: the node holding ``x``, the value the branch reads.
        add_nodes: the add(s) merging the branch output(s) into the stream; the last is the site's output.
        branch_outputs: ``f(x)`` (and ``g(x)``, ... for parallel branches).
        body: the branch's nodes: descendants of ``stream`` that ``branch_outputs`` depend on.
        has_params: the branch holds an op with an ``nn.Parameter``.
        channel_dim: the stream's channel dimension (last for tokens, 1 for channel-first convs).
        channels: C at the channel dimension, when known.
        chain: the chain (residual stream) the site belongs to; set by ``group_chains``.
        prev: the site whose output this site's stream is; set by ``group_chains``.
        rewrite: whether the rewrite pass converts it; ``skip_reason`` says why not.
    """

    index: int
    module_path: str
    stream: fx.Node
    add_nodes: list[fx.Node]
    branch_outputs: list[fx.Node]
    body: list[fx.Node] = field(repr=False)
    has_params: bool
    channel_dim: Optional[int] = None
    channels: Optional[int] = None
    chain: Optional[int] = None
    prev: Optional["ResidualSite"] = field(default=None, repr=False)
    rewrite: bool = True
    skip_reason: str = ""
    param_name: str = ""

    @property
    def output(self) -> fx.Node:
        return self.add_nodes[-1]

    @property
    def branch_size(self) -> int:
        """Number of ops in the branch."""
        return sum(node.op in ("call_function", "call_method", "call_module") for node in self.body)

    def info(self) -> "SiteInfo":
        return SiteInfo(
            index=self.index,
            module_path=self.module_path,
            chain=self.chain,
            branch_size=self.branch_size,
            num_branches=len(self.branch_outputs),
            channels=self.channels,
            rewritten=self.rewrite,
            skip_reason=self.skip_reason,
            param_name=self.param_name,
        )


@dataclass(frozen=True)
class SiteInfo:
    """A residual site as users see it (``gm.mhc_sites``, ``find_residuals``): no graph references."""

    index: int
    module_path: str
    chain: Optional[int]
    branch_size: int
    num_branches: int
    channels: Optional[int]
    rewritten: bool
    skip_reason: str = ""
    param_name: str = ""
