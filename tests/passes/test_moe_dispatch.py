"""Expert dispatch in the passes (issue 21): what carries a mixture-of-experts block's channel axis to its add.

A grouped matmul by an expert weight ``[E, K, N]`` maps over its output's last axis, like a Linear; indexing the
tokens with a tensor (gathering them for the experts, or putting them back in order) keeps every axis after the
index; and an in-place write-back (``out.index_add_``) in a symbolic trace is a use of what it writes, so the
finder sees the experts reach the add and the rewrite keeps the call.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mhc_rewrite

from models import LoopMoE, MoENet
from tolerances import assert_close


class GroupedExperts(nn.Module):
    """Tokens sorted by expert, one grouped matmul by a ``[E, C, C]`` parameter, put back in order by indexing."""

    def __init__(self, width: int = 16, experts: int = 4):
        super().__init__()
        self.router = nn.Linear(width, experts)
        self.weight = nn.Parameter(torch.randn(experts, width, width) / width ** 0.5)

    def forward(self, x):  # (N, C)
        expert, order = torch.sort(self.router(x).argmax(-1))
        offsets = torch.cumsum(torch.bincount(expert, minlength=self.weight.shape[0]), 0).to(torch.int32)
        done = F.grouped_mm(x[order], self.weight, offs=offsets)  # (N, C), sorted by expert
        return x + done[torch.argsort(order)]


def test_a_grouped_matmul_by_a_parameter_decides_the_axis():
    """In bfloat16: torch's grouped matmul has a float32 CPU kernel but its shape function takes bfloat16 only
    (transformers' float32 fallback op is covered by Mixtral in tests/scenarios/test_architectures.py)."""
    torch.manual_seed(0)
    model, x = GroupedExperts().eval().to(torch.bfloat16), torch.randn(12, 16, dtype=torch.bfloat16)
    converted = mhc_rewrite.convert(model, example_inputs=(x,))
    (site,) = converted.mhc_sites
    assert (site.channel_dim, site.channels) == (-1, 16)
    assert "grouped matmul by parameter `weight`" in site.channel_reason
    assert_close(converted(x), model(x), "streams", torch.bfloat16)


class Unpermuted(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x, perm):  # (B, T, C), (B,)
        return x + self.fc(x[perm])[torch.argsort(perm)]  # the axes after the index keep their place


def test_indexing_with_a_tensor_keeps_the_axes_after_it():
    torch.manual_seed(0)
    model, x, perm = Unpermuted().eval(), torch.randn(4, 5, 16), torch.tensor([2, 0, 3, 1])
    converted = mhc_rewrite.convert(model, example_inputs=(x, perm))
    (site,) = converted.mhc_sites
    assert (site.channel_dim, site.channels) == (-1, 16)
    assert_close(converted(x, perm), model(x, perm), "function_at_init")


@pytest.mark.parametrize("with_inputs", [True, False])
def test_an_in_place_write_back_is_seen_and_kept(with_inputs):
    """LoopMoE writes each expert's output back with ``out.index_add_``: the rewrite must neither miss the site
    (its branch reaches the add only through the in-place calls) nor drop the calls (nobody reads their result)."""
    torch.manual_seed(0)
    model, ids = MoENet(LoopMoE).eval(), torch.randint(0, 64, (2, 6))
    converted = mhc_rewrite.convert(model, example_inputs=(ids,) if with_inputs else None)
    assert_close(converted(ids), model(ids), "function_at_init")
    moe = [s for s in converted.mhc_sites + converted.mhc_skipped if s.module_path.endswith("moe")]
    if with_inputs:  # with shapes (the routed tokens' count is a symbol of the data), the site is decided
        assert moe and all(s.rewritten for s in moe), [s.skip_reason for s in moe]
    else:  # without them the reshapes cannot be followed: skipped, saying so
        assert moe and all("without shapes" in s.skip_reason for s in moe)
