"""The channel axis of each residual site, decided from what its branch computes (passes/channel_axis.py).

Every model states its layout in shape comments, with C, H, W (or C, T) of different sizes, so a wrong axis
shows as a wrong size. Each site must report the true axis and C; the converted model must compute the
original function (fp32, within the table's function_at_init tolerance); and each site's phi must have n·C rows.
"""

import json

import pytest
import torch
from torch import nn

import mhc_rewrite

from models import AudioNet, ConvNeXtish, ResNetish, UNetish, ViTish
from tolerances import assert_close

N = 4


def _phi_rows(gm) -> list[int]:
    return [gm.get_submodule(site.param_name).phi.shape[0] for site in gm.mhc_sites]


# name -> (model, example inputs, the true (module path, channel axis, C) of every site, in graph order)
CASES = {
    # GroupNorm + attention over the pixels of (B, 20, 8, 6), ResNet blocks on (B, 8, 16, 12) and (B, 20, 8, 6)
    "unet": (UNetish, lambda: (torch.randn(2, 3, 16, 12), torch.tensor([3.0, 70.0])),
             [("down_res", 1, 8), ("mid_res1", 1, 20), ("mid_attn", 1, 20), ("mid_res2", 1, 20), ("up_res", 1, 8)]),
    "resnet": (ResNetish, lambda: (torch.randn(2, 3, 10, 6),),  # blocks on (B, 8, 10, 6)
               [(f"blocks.{i}", 1, 8) for i in range(3)]),
    # depthwise conv on (B, 16, 10, 6), LayerNorm + MLP + layer scale on (B, 10, 6, 16), permuted back
    "convnext": (ConvNeXtish, lambda: (torch.randn(2, 3, 20, 12),), [("blocks.0", 1, 16), ("blocks.1", 1, 16)]),
    "vit": (ViTish, lambda: (torch.randn(2, 3, 12, 8),),  # tokens (B, 6, 24)
            [(path, -1, 24) for i in range(2) for path in (f"blocks.{i}", f"blocks.{i}.mlp")]),
    # a conv over time and an MLP over the channels (through a transpose) on (B, 12, 20)
    "audio": (AudioNet, lambda: (torch.randn(2, 1, 80),), [(f"blocks.{i}", 1, 12) for i in range(2) for _ in range(2)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_every_site_reports_its_true_channel_axis(name):
    build, inputs, expected = CASES[name]
    torch.manual_seed(0)
    model, x = build().eval(), inputs()
    gm = mhc_rewrite.convert(model, n=N, example_inputs=x)
    assert gm.mhc_skipped == []
    assert [(s.module_path, s.channel_dim, s.channels) for s in gm.mhc_sites] == expected
    assert _phi_rows(gm) == [N * channels for _, _, channels in expected]
    with torch.no_grad():
        assert_close(gm(*x), model(*x), "function_at_init")


def test_the_reason_names_the_op_and_the_moves():
    sites = mhc_rewrite.find_residuals(UNetish(), (torch.randn(2, 3, 16, 12), torch.tensor([3.0, 70.0])))
    attention = next(s for s in sites if s.module_path == "mid_attn")
    assert attention.channel_reason.startswith("axis 1 of the stream [2, 20, 8, 6]: Linear `mid_attn.proj` maps "
                                               "over its last axis; followed through transpose")
    assert "Conv2d `down_res.conv2` maps over axis 1" in sites[0].channel_reason


def test_without_shapes_only_what_needs_no_shape_is_followed():
    # permute names every dim and the layer scale gives C: ConvNeXt is decided without example inputs
    convnext = mhc_rewrite.find_residuals(ConvNeXtish())
    assert [(s.channel_dim, s.channels, s.rewritten) for s in convnext] == [(1, 16, True)] * 2
    assert all("no shapes" in s.channel_reason for s in convnext)
    # transpose(1, 2) of a Linear's last axis needs the rank: that site is skipped, not guessed
    audio = mhc_rewrite.find_residuals(AudioNet())
    assert [(s.channel_dim, s.channels, s.rewritten) for s in audio] == [(1, 12, True), (None, None, False)] * 2
    assert audio[1].skip_reason == "channel axis not decided: `transpose_1` cannot be followed without shapes " \
                                   "(pass example_inputs)"


class LinearOverWidth(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):  # (B, C, H, W)
        return x + self.fc(x)  # the Linear maps over W: that is the axis this branch computes on


class ConvThenSwap(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) with H == W
        return x + self.conv(x).transpose(2, 3)  # swaps two axes of equal size; the channels stay on axis 1


@pytest.mark.parametrize("model, axis", [(ConvNeXtish(channels=8), 1), (ConvThenSwap(8), 1), (LinearOverWidth(8), -1)])
def test_equal_sizes_do_not_decide_the_axis(model, axis):
    # C == H == W == 8: the axis is followed by position through permutes and transposes, never matched by size
    x = torch.randn(2, 3, 16, 16) if isinstance(model, ConvNeXtish) else torch.randn(2, 8, 8, 8)
    gm = mhc_rewrite.convert(model, n=N, example_inputs=(x,))
    assert {(s.channel_dim, s.channels) for s in gm.mhc_sites} == {(axis, 8)}
    with torch.no_grad():
        assert_close(gm(x), model(x), "function_at_init")


class MergedAxis(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * 3 * 5, 4 * 3 * 5)

    def forward(self, x):  # (B, 4, 3, 5)
        return x + self.fc(x.flatten(1)).view_as(x)  # maps over C·H·W at once: no single axis of the stream


class DisagreeingBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.fc = nn.Linear(10, 10)

    def forward(self, x):  # (B, 6, 10)
        return x + self.conv(x) + self.fc(x)  # one branch maps over C (axis 1), the other over T (axis 2)


class ScalarGain(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):  # (B, T, C)
        return x + self.alpha * torch.tanh(x)  # a parameter, but over no axis


@pytest.mark.parametrize("model, x, reason", [
    (MergedAxis(), torch.randn(2, 4, 3, 5), "`view_as` reshapes [2, 60] to [2, 4, 3, 5], which merges or splits it"),
    (DisagreeingBranches(), torch.randn(2, 6, 10),
     "the add gets axis 1 (Conv1d `conv` maps over axis 1) and axis 2 (Linear `fc` maps over its last axis)"),
    (ScalarGain(), torch.randn(2, 3, 4), "no parameterised op of the branch maps over a single axis of the stream"),
])
def test_an_undecidable_axis_is_skipped_with_its_reason(model, x, reason):
    with pytest.warns(UserWarning, match="no residual site to rewrite"):
        assert mhc_rewrite.convert(model, example_inputs=(x,)) is model
    (site,) = mhc_rewrite.find_residuals(model, (x,))
    assert (site.channel_dim, site.channels, site.rewritten) == (None, None, False)
    assert site.channel_reason == reason
    assert site.skip_reason == f"channel axis not decided: {reason}"


class MixerBlock(nn.Module):
    """MLP-Mixer: one branch mixes the tokens (axis 1), the next the channels (the last axis)."""

    def __init__(self, tokens: int, channels: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.token_fc = nn.Linear(tokens, tokens)
        self.norm2 = nn.LayerNorm(channels)
        self.channel_fc = nn.Linear(channels, channels)

    def forward(self, x):  # (B, T, C)
        x = x + self.token_fc(self.norm1(x).transpose(1, 2)).transpose(1, 2)  # maps over T
        return x + self.channel_fc(self.norm2(x))  # maps over C


def test_a_chain_holds_one_layout_and_says_where_it_breaks():
    model, x = nn.Sequential(MixerBlock(6, 10), MixerBlock(6, 10)), torch.randn(2, 6, 10)
    gm = mhc_rewrite.convert(model, n=N, example_inputs=(x,))
    assert [(s.channel_dim, s.channels) for s in gm.mhc_sites] == [(1, 6), (-1, 10)] * 2
    assert [s.chain for s in gm.mhc_sites] == [0, 1, 2, 3]  # each site continues the last one's stream
    assert gm.mhc_sites[0].chain_break == ""
    for prev, site in zip(gm.mhc_sites, gm.mhc_sites[1:]):
        assert site.chain_break == (f"new chain: its stream continues site {prev.index} ({prev.module_path}), whose "
                                    f"branch maps over axis {prev.channel_dim} (C={prev.channels}), but this branch "
                                    f"maps over axis {site.channel_dim} (C={site.channels})")
    assert _phi_rows(gm) == [N * 6, N * 10] * 2
    assert "rewritten (new chain: its stream continues site 0" in str(mhc_rewrite.explain(gm))
    with torch.no_grad():
        assert_close(gm(x), model(x), "function_at_init")


def test_two_layouts_reading_one_stream_get_one_expand_each():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.token_fc, self.channel_fc = nn.Linear(6, 6), nn.Linear(10, 10)

        def forward(self, x):  # (B, T=6, C=10)
            a = x + self.token_fc(x.transpose(1, 2)).transpose(1, 2)
            b = x + self.channel_fc(x)
            return a * b

    model, x = Fork(), torch.randn(2, 6, 10)
    gm = mhc_rewrite.convert(model, n=N, example_inputs=(x,))
    assert [(s.channel_dim, s.channels) for s in gm.mhc_sites] == [(1, 6), (-1, 10)]
    graph = mhc_rewrite.converted_graph(gm, x)
    assert sum(node.target is torch.ops.mhc.expand_streams.default for node in graph.graph.nodes) == 2
    with torch.no_grad():
        assert_close(gm(x), model(x), "function_at_init")


def test_reports_show_channel_dim_beside_channels():
    report = mhc_rewrite.explain(AudioNet(), (torch.randn(2, 1, 80),))
    site = report.to_dict()["sites"][1]
    keys = list(site)
    assert keys.index("channel_dim") == keys.index("channels") + 1
    assert (site["channels"], site["channel_dim"]) == (12, 1) and "transpose_1" in site["channel_reason"]
    assert json.loads(report.to_json())["sites"][1]["channel_dim"] == 1
    header, _, *rows = str(report).split("\n\n", 1)[1].splitlines()
    columns = header.split()
    assert columns[columns.index("C"):columns.index("C") + 2] == ["C", "axis"]
    assert rows[1].split()[5:7] == ["12", "1"]  # after: # module-path chain ops branches


def test_diffusers_unet2d_attention_sites_are_channel_first():
    diffusers = pytest.importorskip("diffusers", reason="diffusers is a dev extra: pip install -e '.[dev]'")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 20])
    gm = mhc_rewrite.convert(model, n=N, example_inputs=(x, t))
    attention = [s for s in gm.mhc_sites if ".attentions." in s.module_path]
    resnets = [s for s in gm.mhc_sites if ".resnets." in s.module_path]
    assert len(attention) == 4 and {(s.channel_dim, s.channels) for s in attention} == {(1, 32)}  # not W = 8
    assert [(s.channel_dim, s.channels) for s in resnets] == [(1, 16), (1, 32), (1, 32)]
    assert _phi_rows(gm) == [N * s.channels for s in gm.mhc_sites]
    with torch.no_grad():
        want, got = model(x, t).sample, gm(x, t)
    assert_close(getattr(got, "sample", got), want, "function_at_init")
