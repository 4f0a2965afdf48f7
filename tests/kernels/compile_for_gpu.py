"""Compile every Triton kernel for a Hopper GPU (sm_90) on a machine without one; prints one JSON line per kernel.

The interpreter (TRITON_INTERPRET=1, how CI runs the kernels) does not type-check a kernel as the compiler does: a
loop-carried variable that changes type, a tile too large for shared memory, or a float argument that Inductor passes
as fp64, passes there and fails on the GPU. This script runs the launchers with CPU tensors, but each launch goes
through ``triton.compile`` (front end, LLVM and the ptxas bundled with triton) instead of running. Run it in a
process of its own: TRITON_INTERPRET must be 0 at import.

    TRITON_INTERPRET=0 python tests/kernels/compile_for_gpu.py
    TRITON_INTERPRET=0 python tests/kernels/compile_for_gpu.py --sweep   # the split pair's blocks: regs and spills
    TRITON_INTERPRET=0 python tests/kernels/compile_for_gpu.py --sweep-one-pass   # the one-pass pair's
"""

import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") != "0":
    sys.exit("run with TRITON_INTERPRET=0: the kernels must be compiled, not interpreted")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mhc_rewrite.kernels import fused_pre, post_res, pre_split, pre_split_backward  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}


def _signature_type(value):
    """As Inductor types a user kernel's arguments: a Python float becomes fp64 (a plain launch would make it fp32)."""
    if isinstance(value, torch.Tensor):
        return POINTER[value.dtype]
    return "i32" if isinstance(value, int) else "fp64"


def _ptxas_report(ptx: str, arch: str) -> dict:
    """Registers and spill bytes as ptxas reports them (``-v``) for the compiled PTX; no GPU needed (the compiled
    kernel's ``n_regs``/``n_spills`` are only filled in when it is loaded onto a device)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        done = subprocess.run([get_ptxas(TARGET.arch).path, "-v", f"--gpu-name={arch}", path, "-o",
                               os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    return {"n_regs": int(regs.group(1)) if regs else None,
            "n_spills": int(spills.group(1)) + int(spills.group(2)) if spills else None}


class _Compile:
    """Stands in for ``wrap_triton(kernel)``: ``[grid](*args, **constexprs)`` compiles instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **constexprs):
            signature = {name: _signature_type(a) for name, a in zip(self.kernel.arg_names, args)}
            signature.update(dict.fromkeys(constexprs, "constexpr"))
            compiled = triton.compile(ASTSource(self.kernel, signature, constexprs=constexprs), target=TARGET,
                                      options={"num_warps": num_warps})
            shown = {k: v for k, v in constexprs.items()
                     if k in ("N", "MODE", "DYNAMIC", "BLOCK_C", "BLOCK_M", "BLOCK_K", "BLOCK_T", "WITH_DY",
                              "ACCUMULATE")}
            report = _ptxas_report(compiled.asm["ptx"], f"sm_{TARGET.arch}a") if RESOURCES else {}
            print(json.dumps({"kernel": self.kernel.__name__, **shown, "shared": compiled.metadata.shared,
                              **report, "dtype": str(args[0].dtype)}), flush=True)
        return launch


# ``--resources``: also run ptxas -v on each kernel for its registers and spills (the BENCHMARKS.md table)
RESOURCES = "--resources" in sys.argv


def main():
    fused_pre.wrap_triton = post_res.wrap_triton = _Compile
    pre_split.wrap_triton = pre_split_backward.wrap_triton = _Compile
    T, C = 32, 256
    for n, dtype, modes in ((4, torch.bfloat16, ("mhc", "hc")), (3, torch.float32, ("mhc",)),
                            (8, torch.float16, ("mhc",))):
        m = n * n + 2 * n
        x, f = torch.randn(T, n, C, dtype=dtype), torch.randn(T, C, dtype=dtype)
        phi, alpha, bias = torch.randn(n * C, m), torch.randn(3), torch.randn(m)
        for mode in modes:
            fused_pre.fused_pre_mix_fwd(x, phi, alpha, bias, None, n, 20, mode)
            if n == 4:  # the backward at n=8 takes ~20 s to compile; its tile is the forward's. mhc: as the lowering
                # runs it (the post-mix's gradient added through the link, ops/fused.py); hc: without a link
                fused_pre.fused_pre_mix_bwd(x, phi, alpha, bias, torch.rand(T, n), f, None, torch.rand(T, n),
                                            torch.rand(T, n, n), n, 20, mode, grad_acc=x if mode == "mhc" else None)
        if n == 4:
            fused_pre.fused_pre_mix_fwd(x, None, None, None, torch.rand(n), n, 20, "mhc")
            post_res.post_res_mix_fwd(x, f, torch.rand(T, n), torch.rand(T, n, n))
            post_res.post_res_mix_bwd(x, f, torch.rand(T, n), torch.rand(T, n, n), torch.randn(T, n, C, dtype=dtype))
        if n != 3:  # the split pair at its default blocks (n=8 backward left out for time, as above)
            pre_split.pre_mix_split_fwd(x, phi, alpha, bias, n, 20, "mhc")
            if n == 4:
                pre_split_backward.pre_mix_split_bwd(x, phi, alpha, bias, torch.rand(T, n), f, None, torch.rand(T, n),
                                                     torch.rand(T, n, n), n, 20, "mhc", grad_acc=x)


def sweep_one_pass():
    """The one-pass pre-mix kernels (the default path) at candidate blocks and warps (``--sweep-one-pass``)."""
    fused_pre.wrap_triton = _Compile
    T, C, n = 32, 256, 4
    m = n * n + 2 * n
    x, f = torch.randn(T, n, C, dtype=torch.bfloat16), torch.randn(T, C, dtype=torch.bfloat16)
    phi, alpha, bias = torch.randn(n * C, m), torch.randn(3), torch.randn(m)
    for block_t, block_c, warps in ((32, 32, 4), (32, 32, 8), (16, 32, 4), (32, 16, 4), (16, 64, 4), (16, 64, 8)):
        print(f"# n={n} one-pass num_warps={warps}", flush=True)
        fused_pre.fused_pre_mix_fwd(x, phi, alpha, bias, None, n, 20, "mhc", block_t, block_c, warps)
        fused_pre.fused_pre_mix_bwd(x, phi, alpha, bias, torch.rand(T, n), f, None, torch.rand(T, n),
                                    torch.rand(T, n, n), n, 20, "mhc", block_t=block_t, block_c=block_c,
                                    num_warps=warps)


def sweep():
    """The split pre-mix kernels at candidate blocks and warps, each line with its ptxas registers and spills
    (``--sweep``; implies ``--resources``): what the defaults in ``pre_split.py`` were chosen from."""
    pre_split.wrap_triton = pre_split_backward.wrap_triton = _Compile
    T, C = 32, 256
    for n, dtype in ((4, torch.bfloat16), (8, torch.float16)):
        m = n * n + 2 * n
        x, f = torch.randn(T, n, C, dtype=dtype), torch.randn(T, C, dtype=dtype)
        phi, alpha, bias = torch.randn(n * C, m), torch.randn(3), torch.randn(m)
        for block_m, block_k, warps in ((64, 64, 4), (64, 64, 8), (32, 64, 4), (64, 32, 4), (32, 32, 4)):
            print(f"# n={n} _project fwd num_warps={warps}", flush=True)
            pre_split.projection(x, phi, None, n, "split", False,
                                 dict(block_m=block_m, block_k=block_k, programs=1024, num_warps=warps))
            if n == 4:
                print(f"# n={n} _project WITH_DY num_warps={warps}", flush=True)
                pre_split.projection(x, phi, f, n, "split", False,
                                     dict(block_m=block_m, block_k=block_k, programs=1024, num_warps=warps))
        tails = ((16, 128, 4), (16, 64, 4), (8, 128, 4), (16, 128, 8)) if n == 4 else (
            (4, 128, 4), (2, 128, 4), (1, 128, 4), (4, 64, 8))
        dxs = ((64, 64, 4), (64, 64, 8), (64, 32, 4), (32, 64, 4), (32, 32, 4)) if n == 4 else ((64, 32, 4),)
        for block_m, block_k, warps in dxs:
            print(f"# n={n} backward: _dx_dphi num_warps={warps} (and _project WITH_DY, _tail_backward)", flush=True)
            pre_split_backward.pre_mix_split_bwd(
                x, phi, alpha, bias, torch.rand(T, n), f, None, torch.rand(T, n), torch.rand(T, n, n), n, 20, "mhc",
                project_blocks=dict(block_m=64, block_k=32), tail_blocks=dict(block_t=8 if n == 4 else 1),
                dx_blocks=dict(block_m=block_m, block_k=block_k, programs=1024, num_warps=warps))
        for block_t, block_c, warps in tails:
            print(f"# n={n} _tail num_warps={warps}", flush=True)
            pre_split.pre_mix_split_fwd(x, phi, alpha, bias, n, 20, "mhc", project_blocks=dict(block_m=64),
                                        tail_blocks=dict(block_t=block_t, block_c=block_c, num_warps=warps))


if __name__ == "__main__":
    if "--sweep" in sys.argv:
        RESOURCES = True
        sweep()
    elif "--sweep-one-pass" in sys.argv:
        RESOURCES = True
        sweep_one_pass()
    else:
        main()
