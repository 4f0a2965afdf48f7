"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one; prints one JSON line per kernel.

The interpreter (TRITON_INTERPRET=1, how CI runs the kernels) does not type-check a kernel as the compiler does: a
loop-carried variable that changes type, a tile too large for shared memory, or a float argument that Inductor passes
as fp64, passes there and fails on the GPU. This script runs the launchers with CPU tensors, but each launch goes
through ``triton.compile`` (front end, LLVM and the ptxas bundled with triton) instead of running. Run it in a
process of its own: TRITON_INTERPRET must be 0 at import.

    TRITON_INTERPRET=0 python tests/kernels/compile_for_gpu.py
"""

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") != "0":
    sys.exit("run with TRITON_INTERPRET=0: the kernels must be compiled, not interpreted")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mhc_rewrite.kernels import fused_pre, post_res  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def _signature_type(value):
    """As Inductor types a user kernel's arguments: a Python float becomes fp64 (a plain launch would make it fp32)."""
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    return "i32" if isinstance(value, int) else "fp64"


class _Compile:
    """Stands in for ``wrap_triton(kernel)``: ``[grid](*args, **constexprs)`` compiles instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            signature = {name: _signature_type(a) for name, a in zip(self.kernel.arg_names, args)}
            signature.update(dict.fromkeys(constexprs, "constexpr"))
            compiled = triton.compile(ASTSource(self.kernel, signature, constexprs=constexprs), target=TARGET)
            shown = {k: v for k, v in constexprs.items() if k in ("N", "MODE", "DYNAMIC", "BLOCK_C")}
            print(json.dumps({"kernel": self.kernel.__name__, **shown, "shared": compiled.metadata.shared,
                              "dtype": str(args[0].dtype)}), flush=True)
        return launch


def main():
    fused_pre.wrap_triton = post_res.wrap_triton = _Compile
    T, C = 32, 256
    for n, dtype, modes in ((4, torch.bfloat16, ("mhc", "hc")), (3, torch.float32, ("mhc",)),
                            (8, torch.float16, ("mhc",))):
        m = n * n + 2 * n
        x, f = torch.randn(T, n, C, dtype=dtype), torch.randn(T, C, dtype=dtype)
        phi, alpha, bias = torch.randn(n * C, m), torch.randn(3), torch.randn(m)
        for mode in modes:
            fused_pre.fused_pre_mix_fwd(x, phi, alpha, bias, None, n, 20, mode)
            if n == 4:  # the backward at n=8 takes ~20 s to compile; its tile is the forward's
                fused_pre.fused_pre_mix_bwd(x, phi, alpha, bias, torch.rand(T, n), f, None, torch.rand(T, n),
                                            torch.rand(T, n, n), n, 20, mode)
        if n == 4:
            fused_pre.fused_pre_mix_fwd(x, None, None, None, torch.rand(n), n, 20, "mhc")
            post_res.post_res_mix_fwd(x, f, torch.rand(T, n), torch.rand(T, n, n))
            post_res.post_res_mix_bwd(x, f, torch.rand(T, n), torch.rand(T, n, n), torch.randn(T, n, C, dtype=dtype))


if __name__ == "__main__":
    main()
