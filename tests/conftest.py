import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run on the CPU interpreter (set before import)

import torch._functorch.config  # noqa: E402

# Inductor must call the triton_ops as ops under the interpreter, not compile their kernels for the CPU
# (README: the mhc backend on CPU)
torch._functorch.config.decompose_custom_triton_ops = False
sys.path.insert(0, os.path.dirname(__file__))  # tests/paper.py, tests/tolerances.py
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))  # models, devices, small_factories
