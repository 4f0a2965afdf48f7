"""Where the kernel tests run the Triton kernels: the CPU interpreter by default (CI), or a GPU.

    MHC_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest tests/kernels    # on a GPU machine

The inputs and the float64 references stay on the CPU; ``on_device`` moves a kernel call's tensor arguments to the
device and its results back, so the same assertions check the compiled kernels.
"""

import os

import torch

DEVICE = torch.device(os.environ.get("MHC_TEST_DEVICE", "cpu"))


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    return value


def on_device(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with every tensor argument on DEVICE; tensor results come back to the CPU."""
    result = fn(*_move(args, DEVICE), **{k: _move(v, DEVICE) for k, v in kwargs.items()})
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return _move(result, torch.device("cpu"))
