"""The residual finder on each way of writing ``x + f(x)``, and on adds that look like one and are not.

Each model holds one add; the expected sites are worked out by hand: which add is a residual, which operand is the
stream, which node is the branch output, whether the branch holds a parameter. Small and fast: part of the mutation
run's selection (docs/testing.md).
"""

import pytest
import torch
from torch import fx, nn

from mhc_rewrite.passes import FindResidualSites, SiteAnalysis
from mhc_rewrite.trace import trace


class OneAdd(nn.Module):
    """``combine(x, fc(x))`` for a given way of adding."""

    def __init__(self, combine, width: int = 8, out: int = 8):
        super().__init__()
        self.fc, self.combine = nn.Linear(width, out), combine

    def forward(self, x):
        return self.combine(x, self.fc(x))


FORMS = {
    "x + f(x)": lambda x, f: x + f,
    "f(x) + x": lambda x, f: f + x,
    "torch.add": lambda x, f: torch.add(x, f),
    "torch.add alpha=1": lambda x, f: torch.add(x, f, alpha=1),
    "x.add": lambda x, f: x.add(f),
}
NOT_RESIDUAL = {
    "torch.add alpha=2": lambda x, f: torch.add(x, f, alpha=2),  # x + 2 f(x): the rewrite would drop the 2
    "x.add alpha=0.5": lambda x, f: x.add(f, alpha=0.5),
    "x - f(x)": lambda x, f: x - f,
    "x * f(x)": lambda x, f: x * f,
    "torch.add out=": lambda x, f: torch.add(x, f, out=torch.empty_like(x)),  # writes a buffer the rewrite would lose
}


def _sites(model, example_inputs=None):
    gm = trace(model, example_inputs)
    find = FindResidualSites()
    find(gm)
    return gm, find.analysis.sites


@pytest.mark.parametrize("form", FORMS)
def test_every_way_of_adding_the_branch_is_a_site(form):
    gm, sites = _sites(OneAdd(FORMS[form]))
    x = next(node for node in gm.graph.nodes if node.op == "placeholder")
    fc = next(node for node in gm.graph.nodes if node.target == "fc")
    assert len(sites) == 1, form
    site = sites[0]
    assert site.stream is x and site.branch_outputs == [fc] and site.body == [fc]
    assert site.module_path == "fc" and site.has_params and site.rewrite and site.channels == 8


@pytest.mark.parametrize("form", NOT_RESIDUAL)
def test_other_combinations_are_not_sites(form):
    assert _sites(OneAdd(NOT_RESIDUAL[form]))[1] == []


def test_a_broadcast_add_is_a_site_only_while_shapes_are_unknown():
    model = OneAdd(lambda x, f: x + f, out=1)  # [B, 8] + [B, 1]: a gate, not a branch of the stream's shape
    assert len(_sites(model)[1]) == 1  # no shapes: the structure is trusted
    assert _sites(model, (torch.randn(3, 8),))[1] == []


def test_a_stream_added_to_itself_is_not_a_site():
    assert _sites(OneAdd(lambda x, f: x + x + 0 * f))[1] == []


class Weighted(nn.Module):
    """A branch through a bare ``nn.Parameter`` (a get_attr node), or through a buffer."""

    def __init__(self, parameter: bool):
        super().__init__()
        weight = torch.randn(8, 8)
        if parameter:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def forward(self, x):
        return x + torch.tanh(x @ self.weight)


@pytest.mark.parametrize("parameter", [True, False])
def test_a_bare_parameter_counts_as_a_parameterised_branch_and_a_buffer_does_not(parameter):
    _, sites = _sites(Weighted(parameter), (torch.randn(3, 8),))
    assert len(sites) == 1 and sites[0].has_params == parameter and sites[0].rewrite == parameter
    assert sites[0].skip_reason == ("" if parameter else "branch has no parameterised op")


class ReadTwice(nn.Module):
    """``y = x + f(x)`` read twice: ``y + g(x)`` is no second branch of y's site, since y is also read alone."""

    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = x + self.f(x)
        return (y + self.g(x)) * y


class Parallel(nn.Module):
    """``x + f(x) + g(x) + h(x)``: one site with three branches."""

    def __init__(self):
        super().__init__()
        self.f, self.g, self.h = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.f(x) + self.g(x) + self.h(x)


def test_a_site_output_read_elsewhere_takes_no_further_branch():
    gm, sites = _sites(ReadTwice())
    adds = [node for node in gm.graph.nodes if node.op == "call_function" and "add" in str(node.target)]
    assert len(sites) == 1 and sites[0].add_nodes == adds[:1]
    assert [node.target for node in sites[0].branch_outputs] == ["f"]


def test_three_parallel_branches_form_one_site():
    gm, sites = _sites(Parallel())
    adds = [node for node in gm.graph.nodes if node.op == "call_function" and "add" in str(node.target)]
    assert len(sites) == 1
    site = sites[0]
    assert site.add_nodes == adds and [node.target for node in site.branch_outputs] == ["f", "g", "h"]
    assert [node.target for node in site.body] == ["f", "g", "h"]


def test_a_parameter_that_dynamo_passes_as_an_input_counts_as_a_parameterised_branch():
    """Dynamo hands parameters to a backend as graph inputs; mhc_rewrite's backend tags them ``mhc_parameter``."""
    gm = fx.symbolic_trace(lambda x, weight: x + torch.tanh(x @ weight))
    find = FindResidualSites()
    find(gm)
    assert [site.has_params for site in find.analysis.sites] == [False]  # an untagged input is data
    weight = [node for node in gm.graph.nodes if node.op == "placeholder"][1]
    weight.meta["mhc_parameter"] = True
    find = FindResidualSites()
    find(gm)
    assert [site.has_params for site in find.analysis.sites] == [True]


class ParameterInTheSecondBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.relu(x) + self.fc(x)


def test_a_parameter_in_a_later_branch_makes_the_site_parameterised():
    _, sites = _sites(ParameterInTheSecondBranch())
    assert len(sites) == 1 and len(sites[0].branch_outputs) == 2
    assert sites[0].has_params and sites[0].rewrite


def test_the_find_pass_fills_the_analysis_it_is_given():
    analysis = SiteAnalysis()
    find = FindResidualSites(analysis=analysis)
    find(trace(Parallel()))
    assert find.analysis is analysis and len(analysis.sites) == 1
