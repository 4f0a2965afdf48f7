"""Small models the tests convert: written like nanoGPT, one readable class per architecture."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def perturb_mhc(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every mHC parameter (``mhc.*``) by ``scale`` x N(0, 1), in place, so that a converted model no longer
    computes the identity-initialised function; returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("mhc."):
                p.add_(scale * torch.randn_like(p))
    return model


# --- a toy residual MLP (symbolic_trace works, no example inputs needed) ------------------------------


class MLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):  # (B, C)
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, d_in: int = 6, width: int = 16, depth: int = 4, d_out: int = 3):
        super().__init__()
        self.embed = nn.Linear(d_in, width)
        self.blocks = nn.Sequential(*[MLPBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, d_out)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


# --- nanoGPT-style GPT (its `B, T = idx.size()` defeats symbolic_trace: it goes through torch.export) ---


@dataclass
class GPTConfig:
    block_size: int = 32
    vocab_size: int = 64
    n_layer: int = 3
    n_head: int = 2
    n_embd: int = 32


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head = config.n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C): token + position is not a residual
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


# --- variants the finder must handle ---------------------------------------------------------------


class ParallelBlock(nn.Module):
    """GPT-J style: x + attn(ln(x)) + mlp(ln(x)), with a mask as a side input of one branch."""

    def __init__(self, width: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Linear(width, width)

    def forward(self, x, mask):
        h = self.ln(x)
        return x + self.attn(h) * mask + self.mlp(h)


class ParallelNet(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList([ParallelBlock(width) for _ in range(depth)])
        self.out = nn.Linear(width, 2)

    def forward(self, x, mask):
        for block in self.blocks:
            x = block(x, mask)
        return self.out(x)


class PostNormNet(nn.Module):
    """BERT style: x = norm(x + f(x)); the norm ends each stream, so every site is its own chain."""

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.fcs = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(depth)])

    def forward(self, x):
        for fc, norm in zip(self.fcs, self.norms):
            x = norm(x + torch.tanh(fc(x)))
        return x


class NotResidualNet(nn.Module):
    """Adds that are not residuals: bias add, embedding + position, var + eps, a parameter-free x + g(x)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.emb = nn.Embedding(10, width)
        self.pos = nn.Embedding(10, width)
        self.weight = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, idx, pos):
        x = self.emb(idx) + self.pos(pos)
        x = x @ self.weight + self.bias
        var = x.pow(2).mean(-1, keepdim=True) + 1e-5
        x = x * torch.rsqrt(var)
        return x + 0.5 * torch.tanh(x)  # residual-shaped, but its branch has no parameter


class ConvBlock(nn.Module):
    """Pre-activation residual conv block on channel-first feature maps (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(self.bn(x)))))


class ResNetish(nn.Module):
    def __init__(self, channels: int = 8, depth: int = 3, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ConvBlock(channels) for _ in range(depth)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x):  # (B, 3, H, W)
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


def hf_gpt2(n_layer: int = 2, n_embd: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=2, use_cache=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def hf_llama(n_layer: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layer,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(config).eval()
