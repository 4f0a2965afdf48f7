"""The rewrite pass's graph, node by node, against the structure worked out by hand for small models.

Each new node is named ``mhc_<module path>_<role>`` and carries its provenance (``meta["mhc"]``) and the module
stack of its site; with example inputs it carries a fake value of the shape and dtype a real run gives. Parameters
registered before the trace are reused when they fit and refused when they do not. Small and fast: part of the
mutation run's selection (docs/testing.md).
"""

import pytest
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from mhc_rewrite import MHCConfig, MHCRewriteError
from mhc_rewrite.ops.collapse import CollapseParams
from mhc_rewrite.pipeline import run_pipeline
from mhc_rewrite.site_params import MHCSiteParams
from mhc_rewrite.trace import trace

from models import ParallelNet, ResidualMLP
from tolerances import assert_close

ROLES = ("coefficients", "h_pre", "h_post", "h_res", "pre_mix", "post_res_mix")


def _new_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {node.name: node for node in gm.graph.nodes if "mhc" in node.meta}


def _expected_nodes(prefix: str, site: int, first: bool, last: bool) -> dict[str, tuple[int, str]]:
    """Node name -> (site, role): the six ops of a site and its three parameters; the chain's expand and reduce."""
    want = {f"{prefix}_{role}": (site, role) for role in ROLES}
    want.update({f"{prefix}_{name}": (site, "parameter") for name in ("phi", "alpha", "bias")})
    if first:
        want[f"{prefix}_expand"] = (site, "expand")
    if last:
        want[f"{prefix}_reduce"] = (site, "reduce")
    return want


def test_every_new_node_is_named_and_annotated_after_its_site():
    gm, _ = run_pipeline(trace(ResidualMLP(depth=2)), MHCConfig(n=4))
    want = {**_expected_nodes("mhc_blocks_0", 0, first=True, last=False),
            **_expected_nodes("mhc_blocks_1", 1, first=False, last=True)}
    nodes = _new_nodes(gm)
    assert sorted(nodes) == sorted(want)
    for name, (site, role) in want.items():
        assert nodes[name].meta["mhc"] == {"site": site, "module_path": f"blocks.{site}", "role": role}, name
        assert list(nodes[name].meta["nn_module_stack"]) == ["blocks", f"blocks.{site}"], name  # the block's


class RootResidual(nn.Module):
    """A residual in the model's own forward whose branch runs through two children: its module path is ''."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_a_site_at_the_model_root_is_named_root():
    gm, analysis = run_pipeline(trace(RootResidual()), MHCConfig(n=2))
    assert [site.module_path for site in analysis.sites] == [""]
    assert list(gm.mhc) == ["root"]
    want = _expected_nodes("mhc_root", 0, first=True, last=True)
    nodes = _new_nodes(gm)
    assert sorted(nodes) == sorted(want)
    assert all(nodes[name].meta["mhc"] == {"site": 0, "module_path": "", "role": role}
               for name, (_, role) in want.items())


class _Recorder(fx.Interpreter):
    """Runs the graph for real and keeps every node's output."""

    def __init__(self, gm):
        super().__init__(gm)
        self.outputs = {}

    def run_node(self, node):
        out = self.outputs[node] = super().run_node(node)
        return out


def test_fake_values_of_new_nodes_match_a_real_run():
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    gm, _ = run_pipeline(trace(ResidualMLP(depth=2), (x,)), MHCConfig(n=4))
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(x)
    nodes = _new_nodes(gm)
    assert len(nodes) == 2 * 9 + 2
    for name, node in nodes.items():
        fake, real = pytree.tree_leaves(node.meta["val"]), pytree.tree_leaves(recorder.outputs[node])
        assert [(v.shape, v.dtype) for v in fake] == [(v.shape, v.dtype) for v in real], name


@pytest.mark.parametrize("other", [{"n": 2}, {"channels": 8}, {"dynamic": False}], ids=["n", "width", "static"])
def test_registered_parameters_of_another_shape_are_refused(other):
    """A region retraced for new inputs finds its sites' parameters already in ``gm.mhc``; they must fit."""
    gm = trace(ResidualMLP(width=16, depth=2))
    made_for = MHCConfig(n=other.get("n", 4), dynamic=other.get("dynamic", True))
    gm.add_submodule("mhc", nn.ModuleDict({"blocks_0": MHCSiteParams(made_for, other.get("channels", 16), 0)}))
    with pytest.raises(MHCRewriteError, match="blocks.0 has width 16 in this trace"):
        run_pipeline(gm, MHCConfig(n=4))


def test_registered_parameters_that_fit_are_reused_and_computed_with():
    torch.manual_seed(0)
    model, x = ResidualMLP(width=16, depth=2), torch.randn(5, 6)
    fresh, _ = run_pipeline(trace(model), MHCConfig(n=4))
    gm = trace(model)
    registered = MHCSiteParams(MHCConfig(n=4), 16, 0, "blocks.0")
    with torch.no_grad():
        for p in registered.parameters():
            p.add_(0.1 * torch.randn_like(p))
    gm.add_submodule("mhc", nn.ModuleDict({"blocks_0": registered}))
    run_pipeline(gm, MHCConfig(n=4))
    assert gm.mhc["blocks_0"] is registered and list(gm.mhc) == ["blocks_0", "blocks_1"]
    fresh.mhc.load_state_dict(gm.mhc.state_dict())
    assert torch.equal(gm(x), fresh(x))  # the same graph computes with the same parameters
    assert (gm(x) - model(x)).abs().max() > 1e-3  # the perturbed parameters are the ones computed with


def _coefficient_nodes(gm):
    return [node for node in gm.graph.nodes if node.meta.get("mhc", {}).get("role") == "coefficients"]


@pytest.mark.parametrize("dynamic", [True, False])
def test_the_coefficients_node_takes_the_sites_parameters_and_the_config(dynamic):
    gm, _ = run_pipeline(trace(ResidualMLP(depth=2)), MHCConfig(n=3, sinkhorn_iters=7, mode="hc", dynamic=dynamic))
    nodes = _new_nodes(gm)
    for site, node in enumerate(_coefficient_nodes(gm)):
        assert node.target is torch.ops.mhc.coefficients.default
        streams = nodes["mhc_blocks_0_expand"] if site == 0 else nodes["mhc_blocks_0_post_res_mix"]
        params = [f"mhc.blocks_{site}.{name}" for name in ("phi", "alpha", "bias")]
        if dynamic:
            assert node.args[0] is streams and [a.target for a in node.args[1:4]] == params
        else:
            assert node.args[:3] == (None, None, None) and node.args[3].target == params[2]
        assert node.args[4:] == (3, 7, "hc")


@pytest.mark.parametrize("dynamic", [True, False])
def test_mhc_lite_sites_compute_the_permutation_coefficients(dynamic):
    torch.manual_seed(0)
    model, x = ResidualMLP(width=16, depth=2), torch.randn(5, 6)
    gm, _ = run_pipeline(trace(model, (x,)), MHCConfig(n=3, constraint="permutations", dynamic=dynamic))
    nodes = _coefficient_nodes(gm)
    assert [node.target for node in nodes] == [torch.ops.mhc.coefficients_permutations.default] * 2
    assert all(node.args[4:] == (3,) and (node.args[0] is not None) == dynamic for node in nodes)
    assert gm.mhc["blocks_0"].bias.shape == (2 * 3 + 6,)  # pre, post and one logit per permutation of 3
    assert_close(gm(x), model(x), "function_at_init")


def test_a_learned_collapse_takes_the_place_of_the_exit_reduce():
    torch.manual_seed(0)
    model, x = ResidualMLP(width=16, depth=2), torch.randn(5, 6)
    gm = trace(model, (x,))
    registered = CollapseParams(4, 16, "blocks.1")  # as a converted region's retrace finds it
    gm.add_submodule("mhc", nn.ModuleDict({"blocks_1_collapse": registered}))
    run_pipeline(gm, MHCConfig(n=4, collapse="learned"))
    nodes = _new_nodes(gm)
    assert "mhc_blocks_1_reduce" not in nodes and "mhc_blocks_0_reduce" not in nodes
    collapse = nodes["mhc_blocks_1_collapse"]
    assert collapse.meta["mhc"] == {"site": 1, "module_path": "blocks.1", "role": "collapse"}
    assert collapse.args[0] is nodes["mhc_blocks_1_post_res_mix"] and collapse.meta["val"].shape == (5, 16)
    assert [a.target for a in collapse.args[1:]] == [f"mhc.blocks_1_collapse.{p}" for p in ("phi", "alpha", "bias")]
    assert all(a.meta["mhc"]["role"] == "parameter" for a in collapse.args[1:])
    assert gm.mhc["blocks_1_collapse"] is registered and sorted(gm.mhc) == ["blocks_0", "blocks_1", "blocks_1_collapse"]
    assert_close(gm(x), model(x), "function_at_init")  # the collapse starts as the mean
    with torch.no_grad():
        registered.alpha.fill_(1.0)
    assert (gm(x) - model(x)).abs().max() > 1e-3  # and it is the one computed with


def test_a_fresh_learned_collapse_is_made_for_the_exit_site():
    gm, _ = run_pipeline(trace(ResidualMLP(width=16, depth=2)), MHCConfig(n=4, collapse="learned"))
    collapse = gm.mhc["blocks_1_collapse"]
    assert isinstance(collapse, CollapseParams) and (collapse.n, collapse.channels) == (4, 16)
    assert collapse.module_path == "blocks.1"


class ConvBlocks(nn.Module):
    """Two 1x1-convolution residuals on ``[B, C, H, W]``: channel-first streams."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(channels, channels, 1) for _ in range(2)])

    def forward(self, x):
        for conv in self.convs:
            x = x + conv(torch.relu(x))
        return x


def test_channel_first_streams_are_moved_around_the_ops_and_back():
    x = torch.randn(2, 6, 3, 5)
    gm, _ = run_pipeline(trace(ConvBlocks(), (x,)), MHCConfig(n=2))
    nodes = _new_nodes(gm)
    moves = {name: node for name, node in nodes.items() if node.target is torch.movedim}
    # into the chain once; the branch input out and the branch output in at each site; out at the exit
    assert sorted(moves) == sorted(["mhc_convs_0_to_channel_last", "mhc_convs_0_from_channel_last",
                                    "mhc_convs_0_to_channel_last_1", "mhc_convs_1_from_channel_last",
                                    "mhc_convs_1_to_channel_last", "mhc_convs_1_from_channel_last_1"])
    for name, node in moves.items():
        into = "to_channel_last" in name
        assert node.args[1:] == ((1, -1) if into else (-1, 1)), name
        assert node.meta["mhc"]["role"] == ("to_channel_last" if into else "from_channel_last")
        assert node.meta["val"].shape == ((2, 3, 5, 6) if into else (2, 6, 3, 5)), name


class TwoInputs(nn.Module):
    """The stream is the first input itself: the expand must come after every placeholder."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x, scale):
        return x + self.fc(x) * scale


def test_new_nodes_follow_every_placeholder():
    gm, _ = run_pipeline(trace(TwoInputs()), MHCConfig(n=2))
    ops = [node.op for node in gm.graph.nodes]
    assert ops[:2] == ["placeholder", "placeholder"] and "placeholder" not in ops[2:]
    assert "mhc_fc_expand" in _new_nodes(gm)


def test_a_root_site_with_registered_parameters_of_another_width_names_the_model_root():
    gm = trace(RootResidual(width=8))
    gm.add_submodule("mhc", nn.ModuleDict({"root": MHCSiteParams(MHCConfig(n=2), 6, 0)}))
    with pytest.raises(MHCRewriteError, match="the residual site at the model root has width 8"):
        run_pipeline(gm, MHCConfig(n=2))


def test_the_ops_of_a_checkpointed_block_carry_its_checkpoint_tag():
    gm = trace(ResidualMLP(depth=2))
    block_0_add = next(node for node in gm.graph.nodes if node.op == "call_function" and "add" in str(node.target))
    block_0_add.meta["checkpoint_call"] = 7  # as mhc_rewrite.checkpointing tags the nodes a checkpoint call made
    run_pipeline(gm, MHCConfig(n=2))
    for node in _new_nodes(gm).values():
        assert node.meta.get("checkpoint_call") == (7 if node.meta["mhc"]["site"] == 0 else None), node.name


class OffloadedFirst(nn.Module):
    """A model whose first parameter lives on another device than its stream (``meta``: only its shape is read)."""

    def __init__(self):
        super().__init__()
        self.offloaded = nn.Parameter(torch.empty(4, device="meta"))
        self.blocks = ResidualMLP(width=16, depth=2)

    def forward(self, x):
        scale = self.offloaded.shape[0] // 4  # 1; makes the parameter the traced module's first
        return self.blocks(x) * scale


@pytest.mark.parametrize("collapse", ["mean", "learned"])
def test_new_parameters_are_made_on_the_streams_device(collapse):
    torch.manual_seed(0)
    model, x = OffloadedFirst(), torch.randn(5, 6)
    gm, _ = run_pipeline(trace(model, (x,)), MHCConfig(n=2, collapse=collapse))
    assert {p.device.type for p in gm.mhc.parameters()} == {"cpu"}
    assert_close(gm(x), model(x), "function_at_init")


class SharedBlock(nn.Module):
    """One block applied three times (weight sharing): three sites with one module path."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.blk = nn.Linear(width, width)

    def forward(self, x):
        for _ in range(3):
            x = x + self.blk(x)
        return x


def test_a_reused_block_gets_one_parameter_set_per_application():
    gm, analysis = run_pipeline(trace(SharedBlock()), MHCConfig(n=2))
    assert [site.module_path for site in analysis.sites] == ["blk"] * 3
    assert list(gm.mhc) == ["blk", "blk_1", "blk_2"]
    assert [site.param_name for site in analysis.sites] == ["mhc.blk", "mhc.blk_1", "mhc.blk_2"]
    assert [(p.module_path, p.site_index) for p in gm.mhc.values()] == [("blk", 0), ("blk", 1), ("blk", 2)]


def test_parallel_branches_are_summed_before_the_post_mix():
    torch.manual_seed(0)
    model, x, mask = ParallelNet(width=16, depth=2), torch.randn(5, 16), torch.rand(5, 16)
    gm, _ = run_pipeline(trace(model, (x, mask)), MHCConfig(n=2))
    sums = [node for node in gm.graph.nodes if node.meta.get("mhc", {}).get("role") == "branch_sum"]
    assert len(sums) == 2  # one per site, each adding the second branch to the first
    assert_close(gm(x, mask), model(x, mask), "function_at_init")
