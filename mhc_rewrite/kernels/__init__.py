"""Triton kernels of the mHC ops (launchers in each file); reached through ``mhc_rewrite.ops.fused``.

    fused_pre.py   coefficients + Sinkhorn + pre-mix, forward and backward
    post_res.py    post + residual mix, forward and backward
    layout.py      the flat per-token layout of the logits, gates and Sinkhorn in registers
"""
