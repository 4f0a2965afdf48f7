"""explain(): the report of known models, before and after conversion, as text and as JSON."""

import json

import pytest
import torch

import mhc_rewrite

from models import NotResidualNet, hf_llama


def test_report_of_an_unconverted_llama():
    ids = torch.randint(0, 96, (1, 8))
    report = mhc_rewrite.explain(hf_llama(n_layer=2), (ids,), n=2)
    assert not report.converted and report.config.n == 2
    paths = [f"model.layers.{i}.{part}" for i in range(2) for part in ("self_attn", "mlp")]
    assert [s.module_path for s in report.rewritten] == paths
    assert {s.chain for s in report.rewritten} == {0}
    text = str(report)
    assert text.startswith("LlamaForCausalLM: 4 residual site(s) found; would rewrite 4 in 1 chain(s) with n=2")
    assert all(path in text for path in paths)


def test_report_of_a_converted_model_and_json():
    ids = torch.randint(0, 96, (1, 8))
    gm = mhc_rewrite.convert(hf_llama(n_layer=2), example_inputs=(ids,), filter_fn=lambda s: "mlp" in s.module_path)
    report = mhc_rewrite.explain(gm)
    assert report.converted and report.model == "LlamaForCausalLM"
    assert [s.rewritten for s in report.sites] == [False, True, False, True]
    data = json.loads(report.to_json())
    assert data["summary"] == {"sites": 4, "rewritten": 2, "chains": 2,
                               "new_parameters": sum(p.numel() for p in gm.model.mhc.parameters())}
    assert data["sites"][0]["skip_reason"] == "excluded by filter_fn"
    assert "filter_fn" not in data["config"]
    with pytest.raises(TypeError, match="pass no n or options"):
        mhc_rewrite.explain(gm, n=2)


def test_report_names_skip_reasons():
    idx = torch.randint(0, 10, (2, 5))
    report = mhc_rewrite.explain(NotResidualNet(), (idx, idx))
    assert report.rewritten == [] and "skipped: branch has no parameterised op" in str(report)
