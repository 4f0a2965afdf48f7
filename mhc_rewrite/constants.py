"""Numbers the reference ops and the Triton kernels must share (the kernels cannot import ``ops/``: it imports them)."""

RMS_EPS = 1e-6  # the RMSNorm epsilon of the coefficient path (the paper's)
