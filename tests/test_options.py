"""The options surface: MHCConfig round-trips through a dict, and every bad option a new user might try gets a
message naming the option, the value and what is allowed (issue: one options surface)."""

import json
import pickle

import pytest

import mhc_rewrite
from mhc_rewrite import MHCConfig, MHCRewriteError
from mhc_rewrite.cli import config_from_args, make_parser

from models import ResidualMLP


def test_to_dict_from_dict_round_trip_through_json():
    config = MHCConfig(n=2, dynamic=False, sinkhorn_iters=7, mode="hc", init="paper")
    data = json.loads(json.dumps(config.to_dict()))
    assert data == {"n": 2, "dynamic": False, "sinkhorn_iters": 7, "mode": "hc", "init": "paper",
                    "constraint": "sinkhorn", "collapse": "mean"}
    assert MHCConfig.from_dict(data) == config
    assert MHCConfig.from_dict({}) == MHCConfig()
    assert pickle.loads(pickle.dumps(config)) == config


def test_converted_model_records_its_options_as_a_config():
    gm = mhc_rewrite.convert(ResidualMLP(), n=2, filter_fn=lambda site: True)
    assert gm.mhc_config == MHCConfig(n=2)
    assert pickle.loads(pickle.dumps(gm.mhc_config)).to_dict()["n"] == 2


@pytest.mark.parametrize("data,message", [
    ({"n": 4, "sinkhorn_iter": 5}, "unknown option 'sinkhorn_iter': did you mean 'sinkhorn_iters'? valid options are "
                                   "n, dynamic, sinkhorn_iters, mode, init"),
    ({"filter_fn": None}, "unknown option 'filter_fn': valid options are n, dynamic, sinkhorn_iters, mode, init, "
                          "constraint, collapse"),
    ({"n": "4"}, "n must be an int, got str ('4')"),
])
def test_from_dict_validates_like_user_input(data, message):
    with pytest.raises(TypeError) as info:
        MHCConfig.from_dict(data)
    assert message in str(info.value)


@pytest.mark.parametrize("options,error,message", [
    (dict(n=10**6), ValueError, "n=1000000 is out of range: n must be from 2 to 16 (the paper uses 4"),
    (dict(sinkhorn_iters=10**7), ValueError,
     "sinkhorn_iters=10000000 is out of range: sinkhorn_iters must be from 1 to 200 (the paper uses 20"),
    (dict(n=4, sinkhron_iters=5), TypeError, "unknown option 'sinkhron_iters': did you mean 'sinkhorn_iters'? "
                                             "valid options are n, dynamic, sinkhorn_iters, mode, init, "
                                             "constraint, collapse, filter_fn"),
    (dict(filter=lambda s: True), TypeError, "unknown option 'filter': did you mean 'filter_fn'?"),
    (dict(mode="mch"), ValueError, "mode must be one of ('mhc', 'hc'), got 'mch'"),
])
def test_bad_options_name_option_value_and_what_is_allowed(options, error, message):
    for call in (mhc_rewrite.convert, mhc_rewrite.find_residuals, mhc_rewrite.explain):
        with pytest.raises(error) as info:
            call(ResidualMLP(), **options)
        assert message in str(info.value), call.__name__


def test_misspelt_option_in_the_constructor():
    with pytest.raises(TypeError, match="unknown option 'dynamc': did you mean 'dynamic'"):
        MHCConfig(dynamc=False)


def test_filter_fn_must_return_a_bool():
    def says_no(site):
        return "no"  # truthy: would have been taken as True

    with pytest.raises(MHCRewriteError) as info:
        mhc_rewrite.convert(ResidualMLP(), filter_fn=says_no)
    assert ("filter_fn must return True or False; your filter_fn "
            "test_filter_fn_must_return_a_bool.<locals>.says_no returned 'no' (str) on site 0 (blocks.0)"
            ) in str(info.value)


def test_an_exception_in_filter_fn_names_the_filter_and_the_site():
    def picky(site):
        if site.index == 1:
            raise KeyError("width")
        return True

    with pytest.raises(MHCRewriteError) as info:
        mhc_rewrite.find_residuals(ResidualMLP(), filter_fn=picky)
    assert "your filter_fn test_an_exception_in_filter_fn_names_the_filter_and_the_site.<locals>.picky raised " \
           "KeyError: 'width' on site 1 (blocks.1)" in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_filter_fn_is_not_a_config_option():
    with pytest.raises(TypeError, match="unknown option 'filter_fn'"):
        MHCConfig(filter_fn=lambda site: True)
    with pytest.raises(TypeError, match="filter_fn must be callable"):
        mhc_rewrite.convert(ResidualMLP(), filter_fn=3)


def test_cli_flags_are_the_config_fields():
    args = make_parser().parse_args(["inspect", "m:f", "--n", "2", "--static", "--sinkhorn-iters", "5",
                                     "--mode", "hc", "--init", "paper"])
    assert config_from_args(args) == MHCConfig(n=2, dynamic=False, sinkhorn_iters=5, mode="hc", init="paper")
    defaults = make_parser().parse_args(["inspect", "m:f"])
    assert config_from_args(defaults) == MHCConfig()


def test_compile_takes_the_same_options():
    with pytest.raises(ValueError, match="n=17 is out of range"):
        mhc_rewrite.compile(ResidualMLP(), n=17)
