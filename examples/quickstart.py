"""Quickstart: find the residuals of a small model, convert it, and check it computes the same function.

    python examples/quickstart.py [outputs.pt]
"""

import sys

import torch
from torch import nn
from torch.nn import functional as F

import mhc_rewrite
from mhc_rewrite.inspect import sites_table


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):  # (B, C)
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def main(save=None):
    """Args: save: a path to write the input and both models' outputs to (torch.save), or None."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), *[Block(32) for _ in range(4)], nn.Linear(32, 2))

    print(sites_table(mhc_rewrite.find_residuals(model)))  # what convert() would rewrite

    converted = mhc_rewrite.convert(model, n=4)  # symbolic_trace works here: no example inputs needed
    x = torch.randn(16, 8)
    err = (converted(x) - model(x)).abs().max().item()
    print(f"\n{len(converted.mhc_sites)} sites rewritten; max |converted - original| = {err:.2e}")
    print("new parameters:", [name for name, _ in converted.named_parameters() if name.startswith("mhc.")][:3], "...")
    if save:
        with torch.no_grad():
            torch.save({"original": model(x), "converted": converted(x), "sites": len(converted.mhc_sites)}, save)


if __name__ == "__main__":
    main(save=sys.argv[1] if len(sys.argv) > 1 else None)
