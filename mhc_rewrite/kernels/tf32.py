"""Products at float32 accuracy on TF32 tensor cores (for the split pre-mix kernels).

A TF32 tensor-core product reads 10 explicit mantissa bits of each float32 operand. A 16-bit stream is exact in TF32
(bf16 keeps 7 bits, fp16 10); phi and float32 gradients are not, and one TF32 product rounds the projection by
~2^-11, about 50x the coefficients' tolerance (tests/tolerances.py). ``dot(..., PRECISION="split")`` writes each
inexact operand as ``hi + lo`` (``hi`` its TF32 truncation, exact in TF32; ``lo = x - hi`` exact in float32, then
rounded by the tensor core to 11 bits of its own) and sums ``lo·hi + hi·lo + hi·hi``, dropping ``lo·lo``
(~2^-22 relative): two TF32 products when one operand is exact (a 16-bit stream), three otherwise.

``EMULATE`` truncates every TF32 operand before the product as the tensor core reads it. The CPU interpreter
computes ``tl.dot`` in float32 whatever ``input_precision`` says; the tests emulate to check the split's error itself.
"""

import torch
import triton
import triton.language as tl

# the stream dtypes exact in TF32 (at most 10 explicit mantissa bits): the split needs no ``lo`` for them
TF32_EXACT = (torch.bfloat16, torch.float16)

PRECISIONS = ("split", "tf32", "ieee")


@triton.jit
def tf32_hi(x):
    """``x`` with its low 13 mantissa bits cleared: exactly representable in TF32, and ``x - hi`` is exact."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_product(a, b, acc, EMULATE: tl.constexpr):
    """``acc + a @ b`` on TF32 tensor cores (``EMULATE``: the operands truncated first, as the hardware reads them)."""
    if EMULATE:
        a = tf32_hi(a)
        b = tf32_hi(b)
    return tl.dot(a, b, acc, input_precision="tf32")


@triton.jit
def dot(a, b, acc, A_EXACT: tl.constexpr, B_EXACT: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + a @ b`` (float32 operands). ``PRECISION``: "split" (TF32 tensor cores at float32 accuracy, ``hi + lo``
    for each operand not ``*_EXACT`` in TF32), "tf32" (one TF32 product), "ieee" (float32 FMAs, no tensor cores)."""
    if PRECISION == "ieee":
        out = tl.dot(a, b, acc, input_precision="ieee")
    elif PRECISION == "tf32":
        out = _tf32_product(a, b, acc, EMULATE)
    else:
        a_hi = a if A_EXACT else tf32_hi(a)
        b_hi = b if B_EXACT else tf32_hi(b)
        out = acc
        if not B_EXACT:  # the small terms first
            out = _tf32_product(a_hi, b - b_hi, out, EMULATE)
        if not A_EXACT:
            out = _tf32_product(a - a_hi, b_hi, out, EMULATE)
        out = _tf32_product(a_hi, b_hi, out, EMULATE)
    return out


__all__ = ["PRECISIONS", "TF32_EXACT", "dot", "tf32_hi"]
