"""The residual finder on the architectures it must handle, and on adds that are not residuals."""

import torch
from torch import nn

import mhc_rewrite
from mhc_rewrite.passes import FindResidualSites
from mhc_rewrite.trace import trace

from models import (
    GPT,
    GPTConfig,
    NotResidualNet,
    ParallelNet,
    PostNormNet,
    ResidualMLP,
    ResNetish,
    hf_llama,
)
from tolerances import assert_close


def _sites(model, example_inputs=None, **kw):
    gm = trace(model, example_inputs)
    find = FindResidualSites(**kw)
    find(gm)
    return gm, find.analysis.sites


def test_pre_norm_mlp_blocks():
    _, sites = _sites(ResidualMLP(depth=4))
    assert [s.module_path for s in sites] == [f"blocks.{i}" for i in range(4)]
    assert all(s.rewrite and s.has_params and s.channels == 16 and s.channel_dim == -1 for s in sites)
    assert all(s.branch_size == 4 for s in sites)  # norm, fc1, gelu, fc2


def test_nanogpt_attention_and_mlp_sites():
    gpt = GPT(GPTConfig(n_layer=3))
    _, sites = _sites(gpt, (torch.randint(0, 64, (2, 8)),))
    assert [s.module_path for s in sites] == [f"h.{i}.{part}" for i in range(3) for part in ("attn", "mlp")]
    assert all(s.rewrite for s in sites)


def test_hf_llama_module_paths():
    _, sites = _sites(hf_llama(n_layer=2), (torch.randint(0, 96, (1, 8)),))
    rewritten = [s.module_path for s in sites if s.rewrite]
    assert rewritten == [f"model.layers.{i}.{part}" for i in range(2) for part in ("self_attn", "mlp")]


def test_parallel_branches_with_a_mask_side_input_form_one_site():
    gm, sites = _sites(ParallelNet(depth=3))
    assert len(sites) == 3
    assert all(len(s.branch_outputs) == 2 and len(s.add_nodes) == 2 for s in sites)
    mask = next(node for node in gm.graph.nodes if node.op == "placeholder" and node.name == "mask")
    assert all(mask not in s.body for s in sites)  # a side input is not part of the stream's branch
    assert all(any(mask in node.all_input_nodes for node in s.body) for s in sites)


def test_post_norm_sites():
    _, sites = _sites(PostNormNet(depth=3))
    assert [s.module_path for s in sites] == ["fcs.0", "fcs.1", "fcs.2"]


def test_channel_first_conv_blocks():
    x = torch.randn(2, 3, 8, 8)
    for example in (None, (x,)):  # channel size read off the modules, or from propagated shapes
        _, sites = _sites(ResNetish(channels=8, depth=3), example)
        assert [s.module_path for s in sites] == ["blocks.0", "blocks.1", "blocks.2"]
        assert all(s.channel_dim == 1 and s.channels == 8 for s in sites)


def test_adds_that_are_not_residuals_are_left_alone():
    idx = torch.randint(0, 10, (2, 5))
    gm, sites = _sites(NotResidualNet(), (idx, idx))
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 4  # emb + pos, bias, var + eps, x + 0.5 tanh(x)
    assert len(sites) == 1 and not sites[0].rewrite  # only the parameter-free x + g(x) looks residual
    assert sites[0].skip_reason == "branch has no parameterised op"


def test_projection_shortcut_is_not_a_residual():
    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1)
            self.proj = nn.Conv2d(4, 8, 1)

        def forward(self, x):
            return self.proj(x) + self.conv(x)  # both sides are functions of x: neither is the stream

    _, sites = _sites(Down())
    assert sites == []


def test_filter_fn_chooses_sites():
    _, sites = _sites(ResidualMLP(depth=4), filter_fn=lambda site: site.module_path.endswith(("0", "2")))
    assert [s.rewrite for s in sites] == [True, False, True, False]
    assert sites[1].skip_reason == "excluded by filter_fn"


def test_outer_residual_around_residual_blocks_is_skipped():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ResidualMLP(d_in=16, width=16, depth=2, d_out=16)

        def forward(self, x):
            return x + self.inner(x)

    _, sites = _sites(Outer())
    assert [s.rewrite for s in sites] == [True, True, False]
    assert sites[2].skip_reason == "contains rewritten residual site(s) [0, 1]"


def test_sees_through_noops_on_the_stream():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.drop = nn.Dropout(0.0)

        def forward(self, x):
            x = x + self.a(x)
            x = self.drop(x.clone()).to(torch.float32).contiguous()
            y = x.view(x.shape)
            return y + self.b(y)

    x = torch.randn(3, 8)
    gm = mhc_rewrite.convert(Noisy(), example_inputs=(x,))
    assert [s.chain for s in gm.mhc_sites] == [0, 0]


def test_find_residuals_does_not_modify_the_model():
    model = ResidualMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    infos = mhc_rewrite.find_residuals(model)
    assert [i.module_path for i in infos] == [f"blocks.{i}" for i in range(4)]
    assert all(i.rewritten and i.chain == 0 for i in infos)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("mhc" in name for name, _ in model.named_parameters())


def test_in_place_residual_through_export():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            if x.shape[0] > 100:  # control flow on a size: symbolic_trace fails, torch.export handles it
                return x
            y = x.clone()
            y += self.fc(y)  # aten.add_ in the exported graph
            return y

    model, x = InPlace(), torch.randn(3, 8)
    gm = mhc_rewrite.convert(model, example_inputs=(x,))
    assert [s.module_path for s in gm.mhc_sites] == ["fc"]
    assert_close(gm(x), model(x), "function_at_init")
