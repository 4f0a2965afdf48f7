"""Checks only a GPU can make: Inductor schedules the Triton kernels themselves, at realistic shapes.

Skipped on CPU (the CI machine has no GPU); run on the GPU machine with `python -m pytest tests/kernels/test_gpu.py`.
"""

import pytest
import torch

import mhc_rewrite  # noqa: F401

import paper
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: Inductor compiles user Triton kernels only for CUDA")


def _inputs(T=4096, n=4, C=1024, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(T, n, C, generator=g).to("cuda", dtype), torch.randn(T, C, generator=g).to("cuda", dtype),
            (torch.randn(n * C, n * n + 2 * n, generator=g) / (n * C) ** 0.5).cuda(),
            (0.3 * torch.randn(3, generator=g)).cuda(), torch.randn(n * n + 2 * n, generator=g).cuda())


def test_inductor_compiles_the_fused_kernels_into_its_code():
    from torch._inductor.utils import run_and_get_code

    X, f, phi, alpha, bias = _inputs()

    def block(X, f, phi, alpha, bias):
        y, _, h_post, h_res, link = torch.ops.mhc.fused_pre_mix(X, phi, alpha, bias, 4, 20, "mhc")
        return y, torch.ops.mhc.fused_post_res_mix(X, f, h_post, h_res, link)

    # the conftest turns decomposition off for the CPU interpreter; on a GPU Inductor inlines the kernels (its default)
    with torch._functorch.config.patch(decompose_custom_triton_ops=True):
        (y, out), code = run_and_get_code(torch.compile(block, fullgraph=True), X, f, phi, alpha, bias)
    source = "\n".join(code)
    assert "_fused_pre_mix_fwd" in source and "_post_res_mix_fwd" in source
    h = paper.coefficients(X, phi, alpha, bias, 4, 20)  # float64, on the same bf16 inputs
    assert_close(y, paper.pre_mix(X.double(), h[0]), "streams", torch.bfloat16)
    assert_close(out, paper.post_res_mix(X.double(), f.double(), h[1], h[2]), "streams", torch.bfloat16)
