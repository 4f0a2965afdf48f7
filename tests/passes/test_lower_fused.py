"""The lower pass on a graph: reference mHC ops -> fused triton_ops, same forward and gradients as the graph it
lowered (the fused kernels run under TRITON_INTERPRET=1 here); static sites keep the reference coefficients; a pass
takes graphs only."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class _StreamGradientSums(TorchDispatchMode):
    """Counts the additions whose result is shaped like the n-stream tensor ``[..., n, C]``."""

    def __init__(self, n, width):
        super().__init__()
        self.n, self.width, self.count = n, width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor) and out.shape[-2:] == (self.n, self.width):
            self.count += 1
        return out


def _unlinked(gm):
    """``gm`` with every post-mix's link removed: autograd sums the streams' gradients, as before links."""
    gm = copy.deepcopy(gm)
    for node in gm.graph.nodes:
        if node.target is mhc.fused_post_res_mix.default:
            node.args = node.args[:4]
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


@pytest.mark.parametrize("kernel", ["one_pass", "split"])
def test_the_streams_gradient_is_written_once_per_site(kernel, monkeypatch):
    """Each fused post-mix gets its own site's pre-mix link; the backward then sums no stream-shaped gradients
    (unlinked, autograd sums one per site), and the input's and every parameter's gradients equal float64's."""
    monkeypatch.setenv("MHC_PRE_MIX_KERNEL", kernel)
    gm, x = _rewritten()
    lowered = lower_fused(copy.deepcopy(gm)).graph_module
    posts = [node for node in lowered.graph.nodes if node.target is mhc.fused_post_res_mix.default]
    assert len(posts) == 3
    for post in posts:  # the link is the output of the fused pre-mix that reads the same streams
        pre = post.args[4].args[0]
        assert pre.target is mhc.fused_pre_mix.default and pre.args[0] is post.args[0] and post.args[4].args[1] == 4
    reference = copy.deepcopy(gm).double()
    x64 = x.double().requires_grad_()
    want = torch.autograd.grad(reference(x64).square().sum(), [x64, *reference.parameters()])
    sums = {}
    for name, model in (("linked", lowered), ("unlinked", _unlinked(lowered))):
        xr = x.clone().requires_grad_()
        loss = model(xr).square().sum()
        with _StreamGradientSums(4, 16) as counter:
            got = torch.autograd.grad(loss, [xr, *model.parameters()])
        sums[name] = counter.count
        for (param, _), a, b in zip([("input", None), *model.named_parameters()], got, want):
            assert_close(a, b, "same_math", msg=f"{name} {param}")
    assert sums == {"linked": 0, "unlinked": 3}


def test_lowering_twice_changes_nothing():
    gm, x = _rewritten()
    assert run_passes([LowerFused()], gm)
    code = gm.code
    assert not lower_fused(gm).modified and gm.code == code


def test_the_pass_takes_graphs_only():
    model = mhc_rewrite.convert(ResidualMLP(depth=2))
    with pytest.raises(TypeError, match="mhc_rewrite.lower"):
        lower_fused(model)
