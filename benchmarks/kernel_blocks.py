"""Block sizes of the fused pre-mix kernels on a GPU: time the forward and backward launchers at the benchmark shape
(16384 tokens, n=4, C=4096, bf16) for a few (BLOCK_T, BLOCK_C, num_warps), and the backward's parts (kernel, d_phi
matmul). At the tile measured fastest (32 x 32), ptxas says 8 warps take the backward's spills from 1144 to 12 bytes
(tests/kernels/compile_for_gpu.py --sweep-one-pass; BENCHMARKS.md); the other rows are candidates around it.

    python benchmarks/kernel_blocks.py        # needs CUDA
"""

import torch
from mhc_bench import kernel_inputs, timed

from mhc_rewrite.kernels.fused_pre import fused_pre_mix_bwd, fused_pre_mix_fwd


def ms(fn):
    return 1e3 * timed(fn, torch.device("cuda"))


def main():
    T, n, C = 16384, 4, 4096
    X, d_y, phi, alpha, bias = kernel_inputs(T, n, C, torch.bfloat16, "cuda")  # the branch's shape serves as d_y
    d_post, d_res = torch.randn(T, n, device="cuda"), torch.randn(T, n, n, device="cuda")
    h_pre = fused_pre_mix_fwd(X, phi, alpha, bias, None, n, 20, "mhc")[1]
    print(f"{'BLOCK_T':>8}{'BLOCK_C':>8}{'warps':>6}{'fwd ms':>10}{'bwd ms':>10}")
    # BLOCK_C 64 is the largest the shared-memory cap allows at n=4
    for block_t, block_c, warps in ((32, 32, 4), (32, 32, 8), (32, 16, 4), (32, 16, 8), (16, 64, 8), (16, 32, 4),
                                    (16, 64, 4), (64, 32, 8)):
        try:
            fwd = ms(lambda: fused_pre_mix_fwd(X, phi, alpha, bias, None, n, 20, "mhc", block_t, block_c, warps))
            bwd = ms(lambda: fused_pre_mix_bwd(X, phi, alpha, bias, h_pre, d_y, None, d_post, d_res, n, 20, "mhc",
                                               block_t=block_t, block_c=block_c, num_warps=warps))
            print(f"{block_t:>8}{block_c:>8}{warps:>6}{fwd:>10.3f}{bwd:>10.3f}", flush=True)
        except Exception as exc:  # too large for shared memory or registers
            print(f"{block_t:>8}{block_c:>8}{warps:>6}  failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
    x32 = X.reshape(T, n * C)
    du = torch.randn(T, n * n + 2 * n, device="cuda")
    print(f"d_phi = vec(X)^T @ du alone (float copy + matmul): {ms(lambda: x32.float().T @ du):.3f} ms")


if __name__ == "__main__":
    main()
