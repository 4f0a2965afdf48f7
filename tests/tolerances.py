"""Every numeric tolerance of the test suite, in one table, each set from a measured error.

The errors were measured by ``tests/measure_tolerances.py`` (3 seeds, the kernel tests' shapes, CPU with
TRITON_INTERPRET=1; torch 2.13): the column ``measured`` is the worst it printed. Every comparison uses one
measure, :func:`rel_err` (the error relative to the largest reference value), so a limit reads the same
everywhere. A wrong index, a dropped term or a missing gradient gives errors of order 1, far above every limit.

    from tolerances import assert_close
    assert_close(got, want, "coefficients")                      # float32 kinds
    assert_close(got, want, "streams", torch.bfloat16)           # per stream dtype
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@dataclass(frozen=True)
class Tolerance:
    limit: float  # the largest error an assertion accepts
    measured: float  # the worst error tests/measure_tolerances.py printed
    reason: str  # why the limit sits where it does


TOLERANCES: dict[tuple[str, torch.dtype], Tolerance] = {
    ("float64", torch.float64): Tolerance(
        1e-13, 1.0e-15, "float64 library vs float64 reference: only the order of operations differs; 100x margin"),
    ("few_roundings", F32): Tolerance(
        1e-6, 1.8e-7, "float32 results a few roundings from an exact value (balanced Sinkhorn inputs, copies mixed "
                      "by weights summing to 1): no accumulation over rounds or tokens; 5x margin"),
    ("coefficients", F32): Tolerance(
        1e-5, 3.8e-7, "H_pre/H_post/H_res in float32 (whatever the stream dtype) vs float64; 25x margin"),
    ("coefficient_grads", F32): Tolerance(
        5e-5, 1.9e-6, "d_phi/d_alpha/d_bias accumulate over tokens in float32 vs float64 autograd; 25x margin"),
    ("streams", F32): Tolerance(
        1e-5, 4.6e-7, "float32 stream outputs and their gradients vs float64 on the same inputs; 20x margin"),
    ("streams", BF16): Tolerance(
        1e-2, 7.4e-3, "bf16 outputs are rounded to 8 bits (2^-9 = 2e-3 per rounding, a few roundings per value); "
                      "the limit is the pre-existing one, 1.35x the measured worst, not widened"),
    ("streams", F16): Tolerance(
        2e-3, 9.1e-4, "fp16 outputs are rounded to 11 bits (2^-12 = 2.4e-4 per rounding); 2.2x margin, not widened"),
    ("same_math", F32): Tolerance(
        1e-4, 4.0e-6, "two float32 paths of one function (fused vs reference ops, compiled vs eager), outputs and "
                      "whole-model gradients, relative to each tensor's largest value; 25x margin"),
    ("data_parallel", F32): Tolerance(
        1e-5, 4.0e-7, "DDP's averaged gradients (2 processes) vs one process on the full batch: float32 sums in "
                      "another order; 25x margin (measured once, by the distributed test's own runs)"),
    ("function_at_init", F32): Tolerance(
        1e-5, 3.2e-7, "converted model at identity init vs the original, float32 (the design's promise); 30x margin"),
    ("sinkhorn_rows", F32): Tolerance(
        1e-5, 2.4e-7, "rows are normalised last, so they sum to 1 to float32 rounding; 40x margin"),
    ("sinkhorn_columns_20", F32): Tolerance(
        1e-3, 5.5e-5, "columns after 20 rounds on logits eye(n) + N(0, 0.5^2): convergence, not rounding; 18x"),
    ("sinkhorn_grad", F32): Tolerance(
        1e-5, 7.5e-7, "float32 Sinkhorn backward vs float64 autograd where no entry underflows (|logits| <= 30); "
                      "13x margin"),
    ("sinkhorn_grad_extreme", F32): Tolerance(
        1e-3, 5.6e-5, "the same at |logits| up to 1e3, as a log-domain float32 projection reaches it (logits that "
                      "large carry float32 rounding of 1e3 * 6e-8 into every log-sum); 18x margin"),
    ("loss_vs_fp32", BF16): Tolerance(
        0.1, 1.8e-2, "bf16 training (weights cast, SGD) vs the float32 run, nats, any of 10 steps; 5x margin"),
    ("loss_vs_fp32", F16): Tolerance(
        5e-3, 3.5e-4, "fp16 training (weights cast or autocast, SGD) vs the float32 run, nats; 14x margin"),
}


def tolerance(kind: str, dtype: torch.dtype | None = None) -> float:
    """The limit for one kind of comparison at one dtype (see ``TOLERANCES``); no dtype: the kind's only entry."""
    if dtype is None:
        (dtype,) = [d for k, d in TOLERANCES if k == kind]
    return TOLERANCES[kind, dtype].limit


def rel_err(got, want) -> float:
    """``max |got - want| / max |want|``: the error relative to the largest reference value, in float64."""
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    assert got.shape == want.shape, f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def assert_close(got, want, kind: str, dtype: torch.dtype | None = None, msg: str = "") -> None:
    """Assert ``rel_err(got, want) <= tolerance(kind, dtype)``, naming the kind and the error when it fails."""
    err, limit = rel_err(got, want), tolerance(kind, dtype)
    assert err <= limit, f"{msg + ': ' if msg else ''}{kind} {dtype or ''} error {err:.2e} > limit {limit:.0e}"
