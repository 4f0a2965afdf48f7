"""The graph passes of mhc_rewrite, in pipeline order; each a ``torch.fx`` ``PassBase`` with its options at
construction, composed by ``mhc_rewrite.pipeline``:

    FindResidualSites(filter_fn)    add(x, f(x)) where x is an ancestor of f(x), seen through no-ops
    GroupChains(analysis)           sites on the same residual stream share one n-stream tensor
    RewriteMHC(config, analysis)    expand at each chain head, mHC ops at each site, reduce where the stream leaves
    LowerFused()                    reference mHC ops -> fused Triton ops (triton_op: Inductor schedules them on CUDA)

The find and group passes fill one typed ``SiteAnalysis``; ``requires`` checks refuse a pass run out of order.
"""

from .base import MHCPass, PassOrderError, SiteAnalysis
from .find_residual_sites import FindResidualSites
from .group_chains import GroupChains
from .lower_fused import LowerFused, lower_fused
from .rewrite_mhc import RewriteMHC
from .sites import ResidualSite, SiteInfo

__all__ = ["FindResidualSites", "GroupChains", "LowerFused", "MHCPass", "PassOrderError", "ResidualSite",
           "RewriteMHC", "SiteAnalysis", "SiteInfo", "lower_fused"]
