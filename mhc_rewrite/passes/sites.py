"""What the passes find: ``ResidualSite`` (graph-level, holds nodes) and ``SiteInfo`` (a plain record)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import fx

from ..errors import MHCRewriteError


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
        channel_dim: the stream's channel axis: the axis the branch's last parameterised op maps over, followed
            to the add (``channel_axis``); -1 when it is the last axis; None when it cannot be decided.
        channels: C, the stream's size on that axis.
        channel_reason: how the axis was decided (the op, the moves it was followed through), or why it was not.
        chain: the chain (residual stream) the site belongs to; set by ``group_chains``.
        prev: the site whose output this site's stream is; set by ``group_chains``.
        chain_break: why the site starts a new chain although its stream is an earlier site's output (the two
            map over different axes, and one chain holds one layout); set by ``group_chains``.
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
    channel_reason: str = ""
    chain: Optional[int] = None
    prev: Optional["ResidualSite"] = field(default=None, repr=False)
    chain_break: str = ""
    rewrite: bool = True
    skip_reason: str = ""
    param_name: str = ""

    @property
    def output(self) -> fx.Node:
        return self.add_nodes[-1]

    def width(self) -> int:
        """``channels``, the stream's width; an error naming the site when the trace could not tell it."""
        if self.channels is None:
            raise MHCRewriteError(
                f"cannot tell the width of the residual stream at {self.module_path or 'the model root'}: "
                "pass example_inputs to convert() so that shapes can be propagated"
            )
        return self.channels

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
            channel_dim=self.channel_dim,
            rewritten=self.rewrite,
            skip_reason=self.skip_reason,
            param_name=self.param_name,
            channel_reason=self.channel_reason,
            chain_break=self.chain_break,
        )


@dataclass(frozen=True)
class SiteInfo:
    """A residual site as users see it (``gm.mhc_sites``, ``find_residuals``): no graph references.

    ``channels`` is C on the stream's axis ``channel_dim`` (-1: the last); ``channel_reason`` says how that axis was
    decided, or why not (the site is then skipped); ``chain_break`` says why a site starts a new chain although it
    continues an earlier site's stream.
    """

    index: int
    module_path: str
    chain: Optional[int]
    branch_size: int
    num_branches: int
    channels: Optional[int]
    channel_dim: Optional[int]
    rewritten: bool
    skip_reason: str = ""
    param_name: str = ""
    channel_reason: str = ""
    chain_break: str = ""


def ask_filter(filter_fn: Callable[[ResidualSite], bool], site: ResidualSite) -> bool:
    """Call the user's ``filter_fn`` on ``site``: its answer must be a bool, and its errors name it and the site.

    Raises:
        MHCRewriteError: ``filter_fn`` raised (chained) or returned something other than True/False.
    """
    name = getattr(filter_fn, "__qualname__", None) or repr(filter_fn)
    where = f"site {site.index} ({site.module_path or '<root>'})"
    try:
        answer = filter_fn(site)
    except Exception as exc:
        raise MHCRewriteError(f"your filter_fn {name} raised {type(exc).__name__}: {exc} on {where}") from exc
    if not isinstance(answer, bool):
        raise MHCRewriteError(f"filter_fn must return True or False; your filter_fn {name} returned "
                              f"{answer!r} ({type(answer).__name__}) on {where}")
    return answer
