"""What the passes share: ``SiteAnalysis`` (the typed result of the analysis passes) and ``MHCPass``.

Every pass is a ``torch.fx.passes.infra.pass_base.PassBase``: options at construction, ``requires`` checked before
``call`` and ``ensures`` after, run by ``torch.fx.passes.infra.pass_manager.PassManager`` (``mhc_rewrite.pipeline``).
The analysis passes fill one ``SiteAnalysis`` that the later passes are given at construction, and that records how
far the analysis went, so a pass run out of order or after a skipped one refuses with the missing requirement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import MHCRewriteError
from .sites import ResidualSite


class PassOrderError(MHCRewriteError):
    """A pass ran before the pass it needs (or that pass was skipped); the message names both."""


@dataclass(eq=False)
class SiteAnalysis:
    """The residual sites of one graph, as far as the analysis passes have got.

    Attributes:
        sites: every residual site in graph order (skipped ones have ``rewrite=False`` and a ``skip_reason``).
        graph: the graph the sites were found in; None until ``FindResidualSites`` has run.
        grouped: ``GroupChains`` has linked the sites into chains.
        rewritten: ``RewriteMHC`` has rewritten the sites (their nodes are gone from the graph).
    """

    sites: list[ResidualSite] = field(default_factory=list)
    graph: Optional[fx.Graph] = None
    grouped: bool = False
    rewritten: bool = False

    @property
    def to_rewrite(self) -> list[ResidualSite]:
        return [site for site in self.sites if site.rewrite]


class MHCPass(PassBase):
    """A pass of mhc_rewrite: a failure that is not an ``MHCRewriteError`` is re-raised naming the pass."""

    def __call__(self, graph_module: fx.GraphModule) -> Optional[PassResult]:
        try:
            return super().__call__(graph_module)
        except MHCRewriteError:
            raise
        except Exception as exc:
            raise MHCRewriteError(f"the {type(self).__name__} pass failed: {type(exc).__name__}: {exc}") from exc

    def require(self, condition: bool, needed: str, what: str) -> None:
        """Raise ``PassOrderError`` naming this pass and the pass it ``needed`` unless ``condition`` holds."""
        if not condition:
            raise PassOrderError(f"{type(self).__name__} requires {needed} to have run first on this graph: {what}")
