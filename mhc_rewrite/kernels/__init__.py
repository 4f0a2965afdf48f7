"""Triton kernels of the mHC ops (launchers in each file); reached through ``mhc_rewrite.ops.fused``.

    fused_pre.py   coefficients + Sinkhorn + pre-mix in one pass, forward and backward (the default)
    pre_split.py   the same as a split-K projection on tensor cores + a tail (forward; MHC_PRE_MIX_KERNEL=split)
    pre_split_backward.py   its backward: recompute, dx + split-M d_phi in one pass
    tf32.py        float32-accurate products on TF32 tensor cores (hi + lo splits)
    post_res.py    post + residual mix, forward and backward
    layout.py      the flat per-token layout of the logits, gates and Sinkhorn in registers
"""
