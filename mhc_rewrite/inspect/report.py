"""``explain``: what convert() would do to a model, or did to a converted one, as a table and as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from ..config import MHCConfig, resolve_config
from ..convert import find_residuals
from ..passes.sites import SiteInfo
from .text import sites_table


@dataclass
class Report:
    """The residual sites of one model and what the rewrite does with them.

    Prints as a table; :meth:`to_dict` / :meth:`to_json` give the same content as data.
    """

    model: str
    converted: bool
    config: MHCConfig
    sites: list[SiteInfo]
    new_parameters: Optional[int] = None
    diagnostics: Optional[dict[str, Any]] = field(default=None, repr=False)

    @property
    def rewritten(self) -> list[SiteInfo]:
        return [s for s in self.sites if s.rewritten]

    def summary(self) -> str:
        chains = len({s.chain for s in self.rewritten})
        verb = "rewrote" if self.converted else "would rewrite"
        line = (f"{self.model}: {len(self.sites)} residual site(s) found; {verb} {len(self.rewritten)} "
                f"in {chains} chain(s) with n={self.config.n}, mode={self.config.mode}, "
                f"{'dynamic' if self.config.dynamic else 'static'}, init={self.config.init}")
        if self.new_parameters is not None:
            line += f"; {self.new_parameters:,} new parameters"
        return line

    def __str__(self) -> str:
        return self.summary() + "\n\n" + sites_table(self.sites)

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "converted": self.converted, "config": self.config.to_dict(),
               "summary": {"sites": len(self.sites), "rewritten": len(self.rewritten),
                           "chains": len({s.chain for s in self.rewritten}), "new_parameters": self.new_parameters},
               "sites": [dataclasses.asdict(s) for s in self.sites]}
        if self.diagnostics is not None:
            out["diagnostics"] = self.diagnostics
        return out

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def explain(model: nn.Module, example_inputs: Any = None, n: Optional[int] = None, *, filter_fn=None,
            **options) -> Report:
    """Describe the residual sites of ``model``: found, rewritten or skipped and why.

    Args:
        model: an unconverted model (analysed as :func:`mhc_rewrite.convert` would) or a converted one
            (described from what was done; ``n`` and options must then be left out).
        example_inputs: as for :func:`mhc_rewrite.convert`.
        n, **options: :class:`MHCConfig` options for an unconverted model.
        filter_fn: as for :func:`mhc_rewrite.convert`, for an unconverted model.
    Returns:
        A :class:`Report`; ``print(report)`` shows the table, ``report.to_json()`` the data.

    Example:
        >>> print(mhc_rewrite.explain(model))
    """
    name = type(model).__name__
    if hasattr(model, "mhc_sites"):
        if n is not None or options or filter_fn is not None:
            raise TypeError("explain() of a converted model describes what was done: pass no n or options")
        sites = sorted(model.mhc_sites + model.mhc_skipped, key=lambda s: s.index)
        new = sum(p.numel() for name_, p in model.named_parameters()
                  if name_.startswith("mhc.") or ".mhc." in name_)
        return Report(getattr(model, "mhc_model_name", name), True, model.mhc_config, sites, new_parameters=new)
    config = resolve_config(n, None, options, filter_fn)
    return Report(name, False, config, find_residuals(model, example_inputs, filter_fn=filter_fn, **config.to_dict()))
