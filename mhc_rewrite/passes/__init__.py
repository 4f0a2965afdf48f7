"""The graph passes of mhc_rewrite, in pipeline order; each is ``GraphModule -> PassResult``.

    find_residual_sites   add(x, f(x)) where x is an ancestor of f(x), seen through no-ops
    group_chains          sites on the same residual stream share one n-stream tensor
    rewrite_mhc           expand at each chain head, mHC ops at each site, reduce where the stream leaves
    lower_fused           reference mHC ops -> fused Triton ops (triton_op: Inductor schedules them on CUDA)
"""

from .find_residual_sites import find_residual_sites
from .group_chains import group_chains
from .lower_fused import lower_fused
from .rewrite_mhc import rewrite_mhc
from .sites import ResidualSite, SiteInfo

__all__ = ["ResidualSite", "SiteInfo", "find_residual_sites", "group_chains", "lower_fused", "rewrite_mhc"]
