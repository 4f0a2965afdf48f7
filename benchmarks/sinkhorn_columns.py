"""How far from doubly stochastic the 20-round Sinkhorn projection lands, against the logit scale.

    python benchmarks/sinkhorn_columns.py [--count 1000] [--n 4] [--iters 20]

Logits ``scale · N(0, 1)`` (``count`` random n x n matrices, float32 and bfloat16 inputs). For ``torch.ops.mhc
.sinkhorn_knopp`` and for the previous one-shift iteration (``exp(L - max L)``, written out below) it prints a
Markdown table: the largest row-sum error, the range of column sums, and how many rows and columns came out all zero.
"""

import argparse

import torch

import mhc_rewrite  # noqa: F401  (registers torch.ops.mhc)


def one_shift(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The projection before the log-domain first round: one shift per matrix, divisions guarded by 1e-30."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True).clamp_min(1e-30)
        m = m / m.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return m


def describe(h: torch.Tensor) -> str:
    rows, cols = h.sum(-1), h.sum(-2)
    zero = int((h.amax(-1) == 0).sum()) + int((h.amax(-2) == 0).sum())
    return (f"{(rows - 1).abs().max().item():.1e} | {cols.min().item():.3g} – {cols.max().item():.3g} | "
            f"{(cols - 1).abs().max().item():.2g} | {zero}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    print("| logits | scale | projection | max row-sum error | column sums (min – max) | max column error "
          "| all-zero rows + columns |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for scale in (1.0, 10.0, 1e2, 1e3, 1e4):
            g = torch.Generator().manual_seed(0)
            logits = (scale * torch.randn(args.count, args.n, args.n, generator=g)).to(dtype)
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {scale:g} | mhc::sinkhorn_knopp | "
                  f"{describe(torch.ops.mhc.sinkhorn_knopp(logits, args.iters))} |")
            print(f"| {name} | {scale:g} | previous (one shift) | {describe(one_shift(logits.float(), args.iters))} |")


if __name__ == "__main__":
    main()
