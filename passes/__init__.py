"""The graph passes of mhc_rewrite, in pipeline order; each is ``GraphModule -> PassResult``.

    find_residual_sites   add(x, f(x)) where x is an ancestor of f(x), seen through no-ops
    group_chains          sites on the same residual stream share one n-stream tensor
    rewrite_mhc           expand at each chain head, mHC ops at each site, reduce where the stream leaves
"""

from .find_residual_sites import find_residual_sites
from .group_chains import group_chains
from .rewrite_mhc import rewrite_mhc
from .sites import ResidualSite, SiteInfo

__all__ = ["ResidualSite", "SiteInfo", "find_residual_sites", "group_chains", "rewrite_mhc"]
