"""recompute_streams: the same loss and bit-identical gradients, with fewer bytes saved for backward."""

import pytest
import torch
from torch.nn import functional as F

import mhc_rewrite
from mhc_rewrite.recompute import count_saved_bytes

from models import GPT, GPTConfig, perturb_mhc


def _model(layers=4):
    torch.manual_seed(0)
    idx = torch.randint(0, 64, (4, 17))
    gm = mhc_rewrite.convert(GPT(GPTConfig(n_layer=layers, n_embd=32)), example_inputs=(idx[:, :-1],))
    return perturb_mhc(gm), idx


def _step(gm, idx, context):
    with context:
        loss = F.cross_entropy(gm(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    return loss, torch.autograd.grad(loss, list(gm.parameters()))


@pytest.mark.parametrize("every,fused", [(1, False), (2, False), (3, False), (None, False), (2, True)])
def test_same_gradients_fewer_bytes(every, fused):
    gm, idx = _model()
    if fused:
        mhc_rewrite.lower(gm)
    plain = count_saved_bytes()
    loss, grads = _step(gm, idx, plain)
    recompute = mhc_rewrite.recompute_streams(gm, every=every)
    loss_r, grads_r = _step(gm, idx, recompute)
    assert torch.equal(loss, loss_r)
    for a, b in zip(grads, grads_r):
        assert torch.equal(b, a)  # bit-identical: the recompute replays the same operations
    sites, n, tokens, width = 8, 4, 4 * 16, 32
    stream_bytes = n * tokens * width * 4
    kept_streams = -(-sites // recompute.every)  # one stream kept per segment
    assert recompute.kept_bytes == plain.kept_bytes - (sites - kept_streams) * stream_bytes


def test_default_segment_is_the_papers():
    gm, _ = _model(layers=6)  # 12 sites in one chain, n = 4: sqrt(4 * 12 / 6) = 2.83
    assert mhc_rewrite.recompute_streams(gm).every == 3


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs a model returned by mhc_rewrite.convert"):
        mhc_rewrite.recompute_streams(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every must be >= 1, got 0"):
        mhc_rewrite.recompute_streams(every=0)
