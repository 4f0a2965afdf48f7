"""The mHC ops, registered with ``torch.library`` under the ``mhc`` namespace (``torch.ops.mhc.*``).

Importing this package registers them. Each op has a pure-PyTorch reference (``*_ref``), a fake kernel
for tracing, and autograd.
"""

from .coefficients import MODES, coefficients, coefficients_ref, num_logits
from .fused import fused_post_res_mix, fused_pre_mix, use_triton
from .mixing import expand_streams, post_res_mix, post_res_mix_ref, pre_mix, pre_mix_ref, reduce_streams
from .permutations import coefficients_permutations, coefficients_permutations_ref
from .sinkhorn import sinkhorn_knopp, sinkhorn_knopp_ref

__all__ = [
    "MODES",
    "coefficients",
    "coefficients_permutations",
    "coefficients_permutations_ref",
    "coefficients_ref",
    "expand_streams",
    "fused_post_res_mix",
    "fused_pre_mix",
    "num_logits",
    "post_res_mix",
    "post_res_mix_ref",
    "pre_mix",
    "pre_mix_ref",
    "reduce_streams",
    "sinkhorn_knopp",
    "sinkhorn_knopp_ref",
    "use_triton",
]
