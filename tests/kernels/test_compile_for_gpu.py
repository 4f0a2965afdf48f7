"""The Triton kernels compile for a Hopper GPU and fit its shared memory, checked without a GPU.

CI runs the kernels under the interpreter, which accepted a kernel that the compiler rejects (a loop-carried
variable changing type: the first GPU run failed on it, 2026-11-26). tests/kernels/compile_for_gpu.py compiles every
kernel variant the launchers produce (both modes, static, n = 3, 4, 8, three dtypes) with triton's own compiler.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")

# a Hopper block may take at most 227 KB of shared memory (CUDA programming guide, compute capability 9.0)
HOPPER_SHARED_BYTES = 227 * 1024
SCRIPT = os.path.join(os.path.dirname(__file__), "compile_for_gpu.py")


def test_every_kernel_compiles_for_sm90_within_shared_memory():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, SCRIPT, "--resources"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = [json.loads(line) for line in done.stdout.splitlines()]
    names = {k["kernel"] for k in kernels}
    assert names == {"_fused_pre_mix_fwd", "_fused_pre_mix_bwd", "_post_res_mix_fwd", "_post_res_mix_bwd",
                     "_project", "_tail", "_tail_backward", "_dx_dphi"}
    # one-pass: n=4 fwd+bwd in two modes, static fwd, post fwd+bwd; n=3 and n=8: fwd (9). Split pair: n=4 projection,
    # tail, backward projection, tail backward, dx/d_phi; n=8 projection and tail (7)
    assert len(kernels) == 16
    # both pre-mix backward kernels as the lowering runs them: adding the post-mix's stream gradient (the link)
    linked = {k["kernel"] for k in kernels if k.get("ACCUMULATE")}
    assert linked == {"_fused_pre_mix_bwd", "_dx_dphi"}, linked
    for k in kernels:
        assert k["shared"] <= HOPPER_SHARED_BYTES, k
    # the split pair's default blocks (pre_split.default_blocks) and the post-mix backward's were chosen to spill
    # nothing (ptxas -v)
    split = [k for k in kernels if k["kernel"] in ("_project", "_tail", "_tail_backward", "_dx_dphi",
                                                   "_post_res_mix_bwd")]
    assert split and all(k["n_spills"] == 0 and k["n_regs"] <= 255 for k in split), split
