"""The passes as torch.fx PassBase passes under a PassManager: each pass on its own, and the requires checks that
refuse a skipped or reordered pass (naming the pass and what it needs)."""

import copy

import pytest
import torch
from torch.fx.passes.infra.pass_base import PassResult

from mhc_rewrite import MHCConfig, MHCRewriteError
from mhc_rewrite.passes import (
    FindResidualSites,
    GroupChains,
    LowerFused,
    MHCPass,
    PassOrderError,
    RewriteMHC,
    SiteAnalysis,
)
from mhc_rewrite.pipeline import run_analysis, run_passes, run_pipeline
from mhc_rewrite.trace import trace

from models import ResidualMLP
from tolerances import assert_close

mhc = torch.ops.mhc


def _count(gm, op):
    return sum(node.target is op for node in gm.graph.nodes)


def _setup(depth=4):
    torch.manual_seed(0)
    model = ResidualMLP(depth=depth)
    return model, trace(model), torch.randn(5, 6)


def test_find_fills_a_typed_analysis_and_leaves_the_graph_alone():
    _, gm, _ = _setup()
    code = gm.code
    find = FindResidualSites()
    assert run_passes([find], gm) is False
    assert isinstance(find.analysis, SiteAnalysis) and find.analysis.graph is gm.graph
    assert [s.module_path for s in find.analysis.sites] == [f"blocks.{i}" for i in range(4)]
    assert not find.analysis.grouped and gm.code == code and "mhc_sites" not in gm.meta


def test_group_links_the_sites_into_one_chain():
    _, gm, _ = _setup()
    analysis = run_analysis(gm)
    assert analysis.grouped and [s.chain for s in analysis.sites] == [0, 0, 0, 0]
    assert [s.prev.index if s.prev else None for s in analysis.sites] == [None, 0, 1, 2]


def test_rewrite_one_expand_one_reduce_and_the_same_function():
    model, gm, x = _setup()
    gm, analysis = run_pipeline(gm, MHCConfig(n=4))
    assert analysis.rewritten
    assert (_count(gm, mhc.expand_streams.default), _count(gm, mhc.reduce_streams.default)) == (1, 1)
    assert _count(gm, mhc.coefficients.default) == 4
    assert_close(gm(x), model(x), "function_at_init")


def test_lower_replaces_the_reference_ops_and_keeps_the_function():
    model, _, x = _setup()
    gm, _ = run_pipeline(trace(model, (x,)), MHCConfig(n=4))  # with example inputs: nodes carry fake values
    shapes = {node.meta["mhc"]["site"]: node.meta["val"].shape for node in gm.graph.nodes
              if node.target is mhc.pre_mix.default}
    with torch.no_grad():
        for p in gm.mhc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference = copy.deepcopy(gm)
    assert run_passes([LowerFused()], gm) is True
    assert _count(gm, mhc.coefficients.default) == _count(gm, mhc.pre_mix.default) == 0
    assert _count(gm, mhc.fused_pre_mix.default) == 4 and _count(gm, mhc.fused_post_res_mix.default) == 4
    assert_close(gm(x), reference(x), "same_math")
    for node in gm.graph.nodes:
        if node.target is mhc.fused_pre_mix.default:
            site = node.meta["mhc"]["site"]
            block_input = next(u for u in node.users if u.args[1] == 0)
            assert block_input.meta["val"].shape == shapes[site] and len(node.meta["val"]) == 5
        if node.target is mhc.fused_post_res_mix.default:  # the link, a fake value shaped like the streams
            assert node.meta["val"].shape == (5, 4, 16) and node.args[4].meta["val"].shape == (5, 4, 16)


def test_skipping_group_chains_is_refused():
    _, gm, _ = _setup()
    find = FindResidualSites()
    with pytest.raises(PassOrderError) as info:
        run_passes([find, RewriteMHC(MHCConfig(), find.analysis)], gm)
    assert str(info.value).startswith("RewriteMHC requires GroupChains to have run first on this graph: the sites "
                                      "are not grouped into chains")


def test_without_the_check_the_skipped_pass_would_have_split_the_chain():
    """What the requires check prevents: the rewrite alone builds one expand and one reduce per site, and its
    ensures check (at most one expand per chain) refuses that graph."""
    _, gm, _ = _setup()
    find = FindResidualSites()
    run_passes([find], gm)
    rewrite = RewriteMHC(MHCConfig(), find.analysis)
    rewrite.call(gm)
    assert (_count(gm, mhc.expand_streams.default), _count(gm, mhc.reduce_streams.default)) == (4, 4)
    with pytest.raises(AssertionError, match="4 expand_streams for 1 chain"):
        rewrite.ensures(gm)


def test_reordered_passes_are_refused():
    _, gm, _ = _setup()
    find = FindResidualSites()
    with pytest.raises(PassOrderError, match="GroupChains requires FindResidualSites to have run first on this "
                                             "graph: there are no residual sites of this graph to group"):
        run_passes([GroupChains(find.analysis), find], gm)


def test_analysis_of_another_graph_is_refused():
    _, gm, _ = _setup()
    _, other, _ = _setup()
    analysis = run_analysis(other)
    with pytest.raises(PassOrderError, match="RewriteMHC requires FindResidualSites to have run first on this graph: "
                                             "there are no residual sites of this graph to rewrite"):
        run_passes([RewriteMHC(MHCConfig(), analysis)], gm)


def test_rewriting_twice_is_refused():
    _, gm, _ = _setup()
    find = FindResidualSites()
    rewrite = RewriteMHC(MHCConfig(), find.analysis)
    assert run_passes([find, GroupChains(find.analysis), rewrite], gm) is True
    with pytest.raises(PassOrderError, match="RewriteMHC requires FindResidualSites to have run first on this graph: "
                                             "these sites are already rewritten; find them again on the rewritten "
                                             "graph"):
        run_passes([rewrite], gm)


def test_a_failing_pass_is_named():
    class Broken(MHCPass):
        def call(self, graph_module):
            raise ZeroDivisionError("boom")

    _, gm, _ = _setup()
    with pytest.raises(MHCRewriteError, match="the Broken pass failed: ZeroDivisionError: boom"):
        run_passes([FindResidualSites(), Broken()], gm)


def test_the_graph_is_checked_after_each_pass():
    class Corrupt(MHCPass):
        def call(self, graph_module):
            node = next(n for n in graph_module.graph.nodes if n.op == "call_module")
            node.args = (torch.fx.Node(graph_module.graph, "ghost", "placeholder", "ghost", (), {}),)
            return PassResult(graph_module, True)

    _, gm, _ = _setup()
    with pytest.raises(MHCRewriteError, match="'Corrupt' pass"):
        run_passes([Corrupt()], gm)
