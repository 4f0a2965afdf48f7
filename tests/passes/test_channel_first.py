"""Channel-first sites (``[B, C, H, W]``, channels at dim 1) are rewritten as the same mHC as channel-last ones.

Two models compute the same function, one on ``[B, C, H, W]`` with 1x1 convolutions, one on ``[B, H, W, C]`` with
linear layers holding the same weights. Converted, given the same (moved) mHC parameters, they must still agree:
the rewrite moves channel-first streams to channel-last around the mHC ops and back, and a wrong axis would mix
pixels or channels. Fast enough for the mutation run's selection.
"""

import torch
from torch import nn
from torch.nn import functional as F

import mhc_rewrite

from models import perturb_mhc
from tolerances import assert_close


class ConvNet(nn.Module):
    def __init__(self, channels=6, depth=3):
        super().__init__()
        self.fcs = nn.ModuleList([nn.Conv2d(channels, channels, 1) for _ in range(depth)])

    def forward(self, x):  # (B, C, H, W)
        for fc in self.fcs:
            x = x + fc(F.relu(x))
        return x


class LinearNet(nn.Module):
    def __init__(self, conv_net):
        super().__init__()
        self.fcs = nn.ModuleList()
        for conv in conv_net.fcs:
            linear = nn.Linear(conv.in_channels, conv.out_channels)
            linear.weight.data.copy_(conv.weight.data[:, :, 0, 0])
            linear.bias.data.copy_(conv.bias.data)
            self.fcs.append(linear)

    def forward(self, x):  # (B, H, W, C)
        for fc in self.fcs:
            x = x + fc(F.relu(x))
        return x


def test_channel_first_rewrite_equals_channel_last():
    torch.manual_seed(0)
    conv_net = ConvNet()
    linear_net = LinearNet(conv_net)
    x = torch.randn(2, 6, 3, 5)  # (B, C, H, W), H != W so that a swapped axis changes shapes or values
    first = mhc_rewrite.convert(conv_net, n=3)
    last = mhc_rewrite.convert(linear_net, n=3)
    perturb_mhc(first, scale=0.5)
    mhc_state = {k: v for k, v in first.state_dict().items() if k.startswith("mhc.")}
    assert len(mhc_state) == 3 * 3  # phi, alpha, bias per site
    assert last.load_state_dict(mhc_state, strict=False).unexpected_keys == []  # the same mhc.fcs_{i}.* names
    with torch.no_grad():
        assert_close(first(x).movedim(1, -1), last(x.movedim(1, -1)), "same_math")
