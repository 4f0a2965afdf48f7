import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels, when present, run on the CPU interpreter
sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py
