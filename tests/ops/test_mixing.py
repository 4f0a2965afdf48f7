"""expand / pre_mix / post_res_mix / reduce against per-stream float64 loops, gradients and registration."""

import pytest
import torch

import mhc_rewrite  # noqa: F401

from paper import post_res_mix as _loop_post_res_mix
from paper import pre_mix as _loop_pre_mix
from tolerances import GRADCHECK, assert_close

mhc = torch.ops.mhc
SHAPES = [((5,), 4, 8), ((2, 3), 4, 16), ((2, 3), 2, 8), ((4,), 3, 6)]  # (leading dims, n, C)


def _inputs(lead, n, C, dtype=torch.float64, static=False):
    torch.manual_seed(n * C)
    coeff_lead = () if static else lead
    return (torch.randn(*lead, n, C, dtype=dtype), torch.randn(*lead, C, dtype=dtype),
            torch.rand(*coeff_lead, n, dtype=dtype), torch.rand(*coeff_lead, n, n, dtype=dtype))


@pytest.mark.parametrize("lead,n,C", SHAPES)
@pytest.mark.parametrize("static", [False, True])
def test_mixing_matches_loops(lead, n, C, static):
    X, f, h_post, h_res = _inputs(lead, n, C, static=static)
    assert_close(mhc.pre_mix(X, h_post), _loop_pre_mix(X, h_post), "float64")
    assert_close(mhc.post_res_mix(X, f, h_post, h_res), _loop_post_res_mix(X, f, h_post, h_res), "float64")
    x = X[..., 0, :]
    assert torch.equal(mhc.expand_streams(x, n), torch.stack([x] * n, dim=-2))  # a copy: exact
    assert_close(mhc.reduce_streams(X), sum(X[..., i, :] for i in range(n)) / n, "float64")


@pytest.mark.parametrize("static", [False, True])
def test_gradcheck_float64(static):
    X, f, h_post, h_res = (t.requires_grad_() for t in _inputs((2, 3), 4, 5, static=static))
    assert torch.autograd.gradcheck(mhc.pre_mix, (X, h_post), **GRADCHECK)
    assert torch.autograd.gradcheck(mhc.post_res_mix, (X, f, h_post, h_res), **GRADCHECK)
    assert torch.autograd.gradcheck(lambda x: mhc.expand_streams(x, 4), (f,), **GRADCHECK)
    assert torch.autograd.gradcheck(mhc.reduce_streams, (X,), **GRADCHECK)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_low_precision_pre_mix_backward(dtype, static):
    """The pre-mix's backward with bf16/fp16 streams (a static site's pre-mix is this op), against float64."""
    X, _, h_pre, _ = _inputs((4,), 4, 32, dtype=torch.float32, static=static)
    X = X.to(dtype).requires_grad_()
    h_pre.requires_grad_()
    y = mhc.pre_mix(X, h_pre)
    d_y = torch.randn(y.shape).to(dtype)
    got = torch.autograd.grad(y, (X, h_pre), d_y)
    ref_in = [X.detach().double().requires_grad_(), h_pre.detach().double().requires_grad_()]
    want = torch.autograd.grad(_loop_pre_mix(*ref_in), ref_in, d_y.double())
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_close(got[0], want[0], "streams", dtype, msg="d_streams")
    assert_close(got[1], want[1], "coefficient_grads", msg="d_h_pre")  # float32, accumulated in float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_streams_keep_their_dtype(dtype):
    X, f, h_post, h_res = _inputs((4,), 4, 32, dtype=torch.float32)
    out = mhc.post_res_mix(X.to(dtype), f.to(dtype), h_post, h_res)
    assert out.dtype == dtype
    expected = _loop_post_res_mix(X.to(dtype).double(), f.to(dtype).double(), h_post.double(), h_res.double())
    assert_close(out, expected, "streams", dtype)
    y = mhc.pre_mix(X.to(dtype), h_post)
    assert y.dtype == dtype
    assert_close(y, _loop_pre_mix(X.to(dtype).double(), h_post.double()), "streams", dtype)


def test_opcheck():
    X, f, h_post, h_res = (t.float().requires_grad_() for t in _inputs((2, 3), 4, 8))
    torch.library.opcheck(mhc.pre_mix.default, (X, h_post))
    torch.library.opcheck(mhc.post_res_mix.default, (X, f, h_post, h_res))
    torch.library.opcheck(mhc.expand_streams.default, (f, 4))
    torch.library.opcheck(mhc.reduce_streams.default, (X,))


def test_the_reference_post_mix_runs_on_symbolic_sizes():
    """The fused post-mix's fake pass runs its reference on fake tensors; with symbolic batch and sequence sizes (a
    lowered decoding graph) torch 2.13's ``addcmul`` meta raised. The fake result has the real result's shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from mhc_rewrite.ops.mixing import post_res_mix_ref

    mode = FakeTensorMode(shape_env=ShapeEnv())
    real = _inputs((2, 5), 4, 8, dtype=torch.float32)

    def symbolic(t):  # the two leading sizes symbolic
        sizes = [DimDynamic.DYNAMIC if d < 2 else DimDynamic.STATIC for d in range(t.dim())]
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    fakes = [symbolic(t) for t in real]
    with mode:
        out = post_res_mix_ref(*fakes)
    assert not isinstance(out.shape[0], int)  # the sizes stayed symbolic
    want = post_res_mix_ref(*real)
    assert tuple(int(s) for s in out.shape) == tuple(want.shape) and out.dtype == want.dtype
