"""A block with stochastic depth (``x + drop_path(mlp(norm(x)))``, drop path a parameterless module that runs ops
in train mode and none in eval) converted in train mode, as a model built from its config is: its sites have one
name in both modes, so the eval call finds the parameters made at conversion. Compared with the original in eval
and trained one step (same seed: the same drop masks)."""

import copy

import torch
from torch import nn
from torch.nn import functional as F

import mhc_rewrite

from tolerances import assert_close


class DropPath(nn.Module):
    """Drops the whole branch of a sample with probability p in training (stochastic depth)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, p):
        super().__init__()
        self.norm, self.mlp, self.drop_path = nn.LayerNorm(width), Mlp(width), DropPath(p)

    def forward(self, x):
        return x + self.drop_path(self.mlp(self.norm(x)))


class Net(nn.Module):
    def __init__(self, width=16, depth=3):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.Sequential(*[Block(width, p=0.1 * i) for i in range(depth)])  # drop rate grows with depth
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


def test_converted_in_train_mode_runs_in_both_modes():
    torch.manual_seed(0)
    original = Net()  # train mode, as constructed
    x = torch.randn(8, 5, 4)
    reference = copy.deepcopy(original)
    converted = mhc_rewrite.convert(original, example_inputs=(x,))
    names = [site.module_path for site in converted.mhc_sites]
    assert names == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]  # the same names an eval trace gives
    assert names == [s.module_path for s in mhc_rewrite.find_residuals(copy.deepcopy(reference).eval(), (x,))]
    with torch.no_grad():
        assert_close(converted.eval()(x), reference.eval()(x), "function_at_init")
    converted.train(), reference.train()
    torch.manual_seed(1)
    want = reference(x).square().mean()
    torch.manual_seed(1)
    loss = converted(x).square().mean()
    assert_close(loss, want, "function_at_init")
    loss.backward()
    grads = [p.grad for name, p in converted.named_parameters() if name.startswith("mhc.")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
