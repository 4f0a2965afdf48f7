"""A converted model survives torch.export (save, load, same outputs) and trains in bf16/fp16 without NaN/Inf,
with the coefficient and Sinkhorn math in float32 inside."""

import math
import operator

import pytest
import torch
from torch import fx
from torch.nn import functional as F

import mhc_rewrite

from models import GPT, GPTConfig, hf_llama, perturb_mhc


@pytest.mark.parametrize("build,vocab", [(lambda: GPT(GPTConfig(n_layer=2)), 64), (lambda: hf_llama(2), 96)],
                         ids=["nanogpt", "hf_llama"])
def test_export_save_load_round_trip(tmp_path, build, vocab):
    torch.manual_seed(0)
    idx = torch.randint(0, vocab, (2, 16))
    gm = perturb_mhc(mhc_rewrite.convert(build(), example_inputs=(idx,)))
    program = torch.export.export(gm, (idx,), strict=False)
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    want, got = gm(idx), loaded(idx)
    torch.testing.assert_close(getattr(got, "logits", got), getattr(want, "logits", want))
    ops = {str(node.target) for node in loaded.graph.nodes if node.op == "call_function"}
    assert {"mhc.coefficients.default", "mhc.post_res_mix.default"} <= ops


class _CoefficientDtypes(fx.Interpreter):
    def run_node(self, node):
        out = super().run_node(node)
        if node.op == "call_function" and node.target is operator.getitem and \
                node.args[0].target is torch.ops.mhc.coefficients.default:
            self.dtypes.add(out.dtype)
        return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["autocast", "cast"])
def test_low_precision_training_stays_finite(dtype, how):
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (4, 17))
    gm = mhc_rewrite.convert(GPT(GPTConfig(n_layer=2)), example_inputs=(idx[:, :-1],))
    if how == "cast":
        gm = gm.to(dtype)
    opt = torch.optim.AdamW(gm.parameters(), lr=3e-3, eps=1e-4)
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=dtype, enabled=how == "autocast"):
            logits = gm(idx[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in gm.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    recorder = _CoefficientDtypes(gm)
    recorder.dtypes = set()
    with torch.autocast("cpu", dtype=dtype, enabled=how == "autocast"), torch.no_grad():
        recorder.run(idx[:, :-1])
    assert recorder.dtypes == {torch.float32}  # H_pre, H_post, H_res are float32 whatever the stream dtype
