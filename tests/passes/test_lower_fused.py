"""The lower pass on a graph: reference mHC ops -> fused triton_ops, same forward and gradients as the graph it
lowered (the fused kernels run under TRITON_INTERPRET=1 here); static sites keep the reference coefficients; a pass
takes graphs only."""

import copy

import pytest
import torch

import mhc_rewrite
from mhc_rewrite import MHCConfig
from mhc_rewrite.passes import LowerFused, lower_fused
from mhc_rewrite.pipeline import run_passes, run_pipeline
from mhc_rewrite.trace import trace

from models import ResidualMLP, perturb_mhc
from tolerances import assert_close

mhc = torch.ops.mhc


def _rewritten(dynamic=True):
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    gm, _ = run_pipeline(trace(ResidualMLP(depth=3), (x,)), MHCConfig(n=4, dynamic=dynamic))
    return perturb_mhc(gm), x


def _targets(gm):
    return {node.target for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("dynamic", [True, False])
def test_lowered_graph_computes_what_it_lowered(dynamic):
    gm, x = _rewritten(dynamic)
    lowered = copy.deepcopy(gm)
    assert lower_fused(lowered).modified
    targets = _targets(lowered)
    assert mhc.fused_post_res_mix.default in targets and mhc.post_res_mix.default not in targets
    if dynamic:
        assert mhc.fused_pre_mix.default in targets and mhc.pre_mix.default not in targets
    else:  # a static site's coefficients read no streams: nothing to fuse them with
        assert mhc.coefficients.default in targets and mhc.fused_pre_mix.default not in targets
    want, got = gm(x), lowered(x)
    assert_close(got, want, "same_math")
    grads_want = torch.autograd.grad(want.square().mean(), list(gm.parameters()))
    grads_got = torch.autograd.grad(got.square().mean(), list(lowered.parameters()))
    for (name, _), a, b in zip(gm.named_parameters(), grads_got, grads_want):
        assert_close(a, b, "same_math", msg=name)


def test_lowering_twice_changes_nothing():
    gm, x = _rewritten()
    assert run_passes([LowerFused()], gm)
    code = gm.code
    assert not lower_fused(gm).modified and gm.code == code


def test_the_pass_takes_graphs_only():
    model = mhc_rewrite.convert(ResidualMLP(depth=2))
    with pytest.raises(TypeError, match="mhc_rewrite.lower"):
        lower_fused(model)
