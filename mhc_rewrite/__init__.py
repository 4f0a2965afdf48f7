"""mhc_rewrite: DeepSeek's Manifold-Constrained Hyper-Connections (mHC) for any PyTorch model, by graph rewrite.

    model = mhc_rewrite.convert(model, n=4)

Importing the package registers the ``torch.ops.mhc`` ops.
"""

from . import ops  # noqa: F401  (registers torch.ops.mhc.*)
from .backend import compile
from .config import MHCConfig
from .convert import convert, find_residuals
from .errors import MHCRewriteError, TraceError
from .inspect import explain, stream_diagnostics
from .passes.sites import SiteInfo
from .recompute import recompute_streams
from .region import converted_graph, lower
from .saving import from_pretrained
from .site_params import MHCSiteParams
from .stages import split_stages

__all__ = ["MHCConfig", "MHCRewriteError", "MHCSiteParams", "SiteInfo", "TraceError", "compile", "convert",
           "converted_graph", "explain", "find_residuals", "from_pretrained", "lower", "recompute_streams",
           "split_stages", "stream_diagnostics"]
__version__ = "0.1.0"
