"""Every user-facing error and warning of convert(), checked for what it says."""

import warnings

import pytest
import torch
from torch import fx, nn

import mhc_rewrite
from mhc_rewrite import MHCConfig, MHCRewriteError, TraceError

from models import NotResidualNet, ResidualMLP
from tolerances import assert_close


@pytest.mark.parametrize("options,error,message", [
    (dict(n=1), ValueError, "n=1 has a single stream"),
    (dict(n=0), ValueError, "n=0 is out of range: n must be from 2 to 16"),
    (dict(n=2.0), TypeError, "n must be an int, got float"),
    (dict(mode="mhc2"), ValueError, "mode must be one of ('mhc', 'hc'), got 'mhc2'"),
    (dict(init="zeros"), ValueError, "init must be one of ('identity', 'paper'), got 'zeros'"),
    (dict(sinkhorn_iters=0), ValueError, "sinkhorn_iters=0 is out of range: sinkhorn_iters must be from 1 to 200"),
    (dict(dynamic="yes"), TypeError, "dynamic must be a bool, got str"),
    (dict(filter_fn=3), TypeError, "filter_fn must be callable"),
])
def test_invalid_options(options, error, message):
    with pytest.raises(error) as info:
        mhc_rewrite.convert(ResidualMLP(), **options)
    assert message in str(info.value)


def test_unknown_option_is_refused():
    with pytest.raises(TypeError, match="unknown option 'streams': valid options are n, dynamic"):
        mhc_rewrite.convert(ResidualMLP(), streams=4)


def test_config_and_options_together_are_refused():
    with pytest.raises(TypeError, match="either config=MHCConfig"):
        mhc_rewrite.convert(ResidualMLP(), n=2, config=MHCConfig())


def test_not_a_module():
    with pytest.raises(TypeError, match="convert\\(\\) takes an nn.Module, got function"):
        mhc_rewrite.convert(lambda x: x)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: symbolic_trace cannot follow it
            return x + self.fc(x)
        return x


def test_untraceable_without_example_inputs_says_what_to_pass():
    with pytest.raises(TraceError) as info:
        mhc_rewrite.convert(Untraceable())
    message = str(info.value)
    assert "torch.fx.symbolic_trace failed on Untraceable" in message
    assert "Pass example_inputs=" in message


def test_bad_example_inputs_carry_the_models_own_message():
    model, bad = Untraceable(), torch.ones(2, 3)  # positive sum: reaches fc, whose width is wrong
    with pytest.raises(RuntimeError) as direct:
        model(bad)
    with pytest.raises(MHCRewriteError) as info:
        mhc_rewrite.convert(model, example_inputs=(bad,))
    assert str(direct.value) in str(info.value) and "cannot run the example inputs" in str(info.value)


def test_untraceable_with_good_example_inputs_names_both_failures():
    with pytest.raises(TraceError) as info:
        mhc_rewrite.convert(Untraceable(), example_inputs=(torch.randn(2, 4),))  # data-dependent branch
    message = str(info.value)
    assert "torch.fx.symbolic_trace failed" in message and "torch.export (non-strict)" in message
    assert "model(*example_inputs)" in message


def test_model_without_residuals_is_returned_unchanged_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="Sequential has no residual site to rewrite; returning the model unchanged"):
        assert mhc_rewrite.convert(model) is model


def test_skipped_sites_are_named_in_the_warning():
    idx = torch.randint(0, 10, (2, 5))
    with pytest.warns(UserWarning, match="found 1, all skipped: <root>: branch has no parameterised op"):
        mhc_rewrite.convert(NotResidualNet(), example_inputs=(idx, idx))


def test_converting_twice_is_refused():
    gm = mhc_rewrite.convert(ResidualMLP())
    with pytest.raises(MHCRewriteError, match="already converted"):
        mhc_rewrite.convert(gm)


def test_an_axis_that_needs_shapes_asks_for_example_inputs():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):  # (B, T, 4)
            return x + torch.tanh(x.flatten(0, 1) @ self.w).view(x.shape)  # a reshape after the parameterised op

    with pytest.warns(UserWarning, match=r"channel axis not decided: .*pass example_inputs"):
        unchanged = mhc_rewrite.convert(Functional())  # without shapes the reshape cannot be followed
    assert not isinstance(unchanged, fx.GraphModule)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = mhc_rewrite.convert(Functional(), example_inputs=(torch.randn(2, 3, 4),))
    assert (gm.mhc_sites[0].channel_dim, gm.mhc_sites[0].channels) == (-1, 4)


def test_a_failing_pass_is_named():
    def broken_filter(site):
        raise ValueError("no opinion")

    with pytest.raises(MHCRewriteError, match="your filter_fn .*broken_filter raised ValueError: no opinion on site 0"):
        mhc_rewrite.convert(ResidualMLP(), filter_fn=broken_filter)


@torch.fx.wrap
def _host_round_trip(x):
    return torch.from_numpy(x.detach().numpy().copy())  # fake tensors have no data: shape propagation fails here


def test_shape_propagation_failure_warns_and_conversion_goes_on(caplog):
    class HostOp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return x + self.fc(_host_round_trip(x))

    model = HostOp()
    x = torch.randn(3, 4)
    with caplog.at_level("WARNING", logger="mhc_rewrite.trace"):
        gm = mhc_rewrite.convert(model, example_inputs=(x,))
    assert "could not propagate shapes through the traced graph" in caplog.text
    assert gm.mhc_sites[0].channels == 4  # read off the Linear instead
    assert_close(gm(x), model(x), "function_at_init")


class _FlattenedBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, x):  # (B, T, dim)
        return x + torch.tanh(x.flatten(0, 1) @ self.w).view(x.shape)  # without shapes the view cannot be followed


class _HalfDecidedNet(nn.Module):
    """A residual MLP block (rewritten) then a block whose channel axis is not decided without example inputs."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.flat = _FlattenedBlock(dim)

    def forward(self, x):
        x = x + self.fc(x)
        return self.flat(x)


def test_skipped_sites_are_counted_in_one_warning_at_convert():
    x = torch.randn(2, 3, 8)
    model = _HalfDecidedNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = mhc_rewrite.convert(model)
    messages = [str(w.message) for w in caught if "residual sites were skipped" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in caught]
    assert messages[0].startswith("_HalfDecidedNet: 1 of 2 residual sites were skipped")
    assert "1 channel axis not decided (flat; e.g. " in messages[0] and "mhc_skipped" in messages[0]
    assert caught[0].filename == __file__  # points at the convert() call
    assert [s.module_path for s in converted.mhc_skipped] == ["flat"]
    assert_close(converted(x), model(x), "function_at_init")  # the skipped block still computes the original


def test_no_skip_warning_when_every_block_is_rewritten_or_skipped_by_choice():
    x = torch.randn(2, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        mhc_rewrite.convert(_HalfDecidedNet(), example_inputs=(x,))  # with shapes both blocks are rewritten
        mhc_rewrite.convert(ResidualMLP())
        mhc_rewrite.convert(_HalfDecidedNet(), filter_fn=lambda site: site.module_path != "flat")  # the user's skip
