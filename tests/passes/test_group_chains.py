"""Chains: one n-stream tensor per residual stream, expanded once and reduced where the stream leaves."""

import pytest
import torch
from torch import nn

import mhc_rewrite

from models import GPT, GPTConfig, PostNormNet, ResidualMLP, hf_gpt2, hf_llama
from tolerances import assert_close


def _count(graph, op):
    return sum(node.target is op for node in graph.graph.nodes)


def _structure(converted, *inputs):
    """Sites, chains, and the expands and reduces of the graph the converted model runs for ``inputs``."""
    graph = mhc_rewrite.converted_graph(converted, *inputs)
    return (len(converted.mhc_sites), len({s.chain for s in converted.mhc_sites}),
            _count(graph, torch.ops.mhc.expand_streams.default), _count(graph, torch.ops.mhc.reduce_streams.default))


@pytest.mark.parametrize("layers", [2, 3])
def test_gpt_is_one_chain(layers):
    x = torch.randint(0, 64, (2, 8))
    gm = mhc_rewrite.convert(GPT(GPTConfig(n_layer=layers)), example_inputs=(x,))
    assert _structure(gm, x) == (2 * layers, 1, 1, 1)


@pytest.mark.parametrize("build", [hf_llama, hf_gpt2])
def test_hf_decoders_are_one_chain(build):
    x = torch.randint(0, 96, (1, 8))
    gm = mhc_rewrite.convert(build(n_layer=3), example_inputs=(x,))
    assert _structure(gm, x) == (6, 1, 1, 1)


def test_post_norm_breaks_the_chain_at_every_site():
    gm = mhc_rewrite.convert(PostNormNet(depth=3))
    assert _structure(gm, torch.randn(4, 16)) == (3, 3, 3, 3)


def test_stream_read_mid_chain_gets_its_own_reduce():
    class Taps(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = ResidualMLP(d_in=8, width=8, depth=3, d_out=8)

        def forward(self, x):
            h1 = self.body.blocks[0](x)
            h2 = self.body.blocks[1](h1)
            h3 = self.body.blocks[2](h2)
            return h3, h1.sum(-1)  # h1 is read outside the chain as well

    model = Taps()
    x = torch.randn(4, 8)
    gm = mhc_rewrite.convert(model)
    assert _structure(gm, x) == (3, 1, 1, 2)
    for got, want in zip(gm(x), model(x)):
        assert_close(got, want, "function_at_init")


def test_fork_shares_one_expand():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.f, self.g = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return (x + self.f(x)) * (x + self.g(x))  # two residuals on one stream, not one after the other

    model = Fork()
    x = torch.randn(4, 8)
    gm = mhc_rewrite.convert(model)
    graph = mhc_rewrite.converted_graph(gm, x)
    assert len(gm.mhc_sites) == 2 and _count(graph, torch.ops.mhc.expand_streams.default) == 1
    assert_close(gm(x), model(x), "function_at_init")
