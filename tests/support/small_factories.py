"""Factories for in-process runs of ``python -m mhc_rewrite inspect`` in the picture tests (fast: no Hugging Face)."""

import torch

from models import GPT, GPTConfig


def gpt_two_layers():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2)).eval(), (torch.randint(0, 64, (2, 12)),)
