"""Small models the tests convert: written like nanoGPT, one readable class per architecture (the GPT is the
examples' nanoGPT), and ``perturb_mhc``."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from nanogpt import GPT as ExampleGPT  # noqa: E402
from nanogpt import GPTConfig as ExampleGPTConfig  # noqa: E402


def perturb_mhc(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every mHC parameter (``mhc.*``) by ``scale`` x N(0, 1), in place, so that a converted model no longer
    computes the identity-initialised function; returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("mhc.") or ".mhc." in name:  # the region's mHC parameters, wherever it is
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


# --- nanoGPT: the examples' model (examples/nanogpt.py), at test sizes -----------------------------------------


@dataclass
class GPTConfig(ExampleGPTConfig):
    block_size: int = 32
    vocab_size: int = 64
    n_layer: int = 3
    n_head: int = 2
    n_embd: int = 32


class GPT(ExampleGPT):
    """The examples' nanoGPT with nanoGPT's own first line, ``B, T = idx.size()``: unpacking a size into Python
    ints defeats symbolic_trace, so these tests convert it through torch.export, as users' models often are."""

    def forward(self, idx):
        B, T = idx.size()  # (B, T) token ids
        return super().forward(idx)


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


# --- channel-first and mixed layouts: the channel axis is found from what each branch computes --------------


class ResBlock2d(nn.Module):
    """Diffusion U-Net residual block: GroupNorm, SiLU, conv, plus a projected timestep embedding (a side input)."""

    def __init__(self, channels: int, time_dim: int, groups: int = 4):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, temb):  # x: (B, C, H, W), temb: (B, time_dim)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1) broadcast over the pixels
        return x + self.conv2(F.silu(self.norm2(h)))


class AttnBlock2d(nn.Module):
    """Self-attention over the pixels of a feature map, as in diffusion U-Nets: no convolution in the branch."""

    def __init__(self, channels: int, n_head: int = 2, groups: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.n_head = n_head

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C): one token per pixel
        q, k, v = self.qkv(h).split(C, dim=2)
        q, k, v = (t.view(B, H * W, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B,nh,HW,hs)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(y).transpose(1, 2).reshape(B, C, H, W)  # back to (B, C, H, W)


@dataclass
class UNetConfig:
    in_channels: int = 3
    channels: tuple = (8, 20)  # per resolution; the attention runs at the second, on (B, 20, H/2, W/2)
    time_dim: int = 16


class UNetish(nn.Module):
    """A two-level diffusion U-Net: ResBlock, downsample, ResBlock + attention + ResBlock, upsample, skip concat."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        c0, c1 = config.channels
        self.time_dim = config.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(config.time_dim, config.time_dim), nn.SiLU())
        self.stem = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.down_res = ResBlock2d(c0, config.time_dim)
        self.down = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.mid_res1 = ResBlock2d(c1, config.time_dim)
        self.mid_attn = AttnBlock2d(c1)
        self.mid_res2 = ResBlock2d(c1, config.time_dim)
        self.up = nn.ConvTranspose2d(c1, c0, 2, stride=2)
        self.merge = nn.Conv2d(2 * c0, c0, 1)  # after concatenating the skip connection
        self.up_res = ResBlock2d(c0, config.time_dim)
        self.out = nn.Conv2d(c0, config.in_channels, 3, padding=1)

    def forward(self, x, t):  # x: (B, 3, H, W), t: (B,) diffusion times
        freqs = torch.exp(-math.log(1000.0) * torch.arange(self.time_dim // 2, device=x.device) / (self.time_dim // 2))
        args = t[:, None].float() * freqs[None]
        temb = self.time_mlp(torch.cat([args.sin(), args.cos()], dim=-1))  # (B, time_dim)
        skip = self.down_res(self.stem(x), temb)  # (B, c0, H, W)
        h = self.mid_res1(self.down(skip), temb)  # (B, c1, H/2, W/2)
        h = self.mid_res2(self.mid_attn(h), temb)
        h = self.merge(torch.cat([self.up(h), skip], dim=1))  # (B, c0, H, W)
        return self.out(self.up_res(h, temb))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise conv on (B, C, H, W), then LayerNorm and an MLP on channel-last pixels, layer scale."""

    def __init__(self, channels: int, layer_scale: float = 0.1):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.pwconv1 = nn.Linear(channels, 4 * channels)
        self.pwconv2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(layer_scale * torch.ones(channels))

    def forward(self, x):  # (B, C, H, W)
        h = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)  # (B, C, H, W)


class ConvNeXtish(nn.Module):
    def __init__(self, channels: int = 16, depth: int = 2, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 2, stride=2)  # patchify
        self.blocks = nn.Sequential(*[ConvNeXtBlock(channels) for _ in range(depth)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x):  # (B, 3, H, W)
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, n_head, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):  # (B, T, C)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViTish(nn.Module):
    """Vision transformer: patches of (B, 3, H, W) become tokens (B, T, C), then pre-norm blocks."""

    def __init__(self, dim: int = 24, patch: int = 4, tokens: int = 6, depth: int = 2, classes: int = 5):
        super().__init__()
        self.patchify = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, n_head=2) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # (B, 3, H, W) with (H / patch) * (W / patch) == tokens
        x = self.patchify(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, C)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


class AudioBlock(nn.Module):
    """A 1-D audio encoder block on (B, C, T): a dilated conv over time, then an MLP over the channels."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.conv = nn.Conv1d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.ln = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, 2 * channels)
        self.fc2 = nn.Linear(2 * channels, channels)

    def forward(self, x):  # (B, C, T)
        x = x + self.conv(F.gelu(self.norm(x)))
        h = self.fc2(F.gelu(self.fc1(self.ln(x.transpose(1, 2)))))  # (B, T, C)
        return x + h.transpose(1, 2)  # (B, C, T)


class AudioNet(nn.Module):
    def __init__(self, channels: int = 12, depth: int = 2, classes: int = 4):
        super().__init__()
        self.stem = nn.Conv1d(1, channels, 4, stride=4)  # waveform (B, 1, 4T) -> (B, C, T)
        self.blocks = nn.Sequential(*[AudioBlock(channels, dilation=2**i) for i in range(depth)])
        self.head = nn.Linear(channels, classes)

    def forward(self, wave):  # (B, 1, L)
        return self.head(self.blocks(self.stem(wave)).mean(dim=-1))


# --- mixture of experts: tokens dispatched to experts and back (the channel axis is the hidden axis) -----------


class LoopMoE(nn.Module):
    """Top-k routed experts run by a Python loop over the experts, each writing back with ``index_add_`` (the
    pre-grouped-matmul Hugging Face Mixtral)."""

    def __init__(self, width: int, experts: int = 4, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width)) for _ in range(experts))

    def forward(self, x):  # (B, T, C)
        tokens = x.reshape(-1, x.shape[-1])  # (B*T, C)
        weights, chosen = torch.topk(F.softmax(self.router(tokens), dim=-1), self.top_k, dim=-1)  # (B*T, k)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # the tokens routed to expert e, and in which of their k slots
            out.index_add_(0, token, expert(tokens[token]) * weights[token, slot, None])
        return out.reshape(x.shape)


class ScatterMoE(nn.Module):
    """Top-1 routed experts with a capacity (Switch Transformer): tokens are scattered into per-expert slots
    ``[E, capacity, C]``, the experts are batched matmuls by ``[E, C, H]`` parameters, and each token gathers its
    slot back (tokens over capacity get zero)."""

    def __init__(self, width: int, experts: int = 4, capacity: int = 8):
        super().__init__()
        self.experts, self.capacity = experts, capacity
        self.router = nn.Linear(width, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, width, 2 * width) / math.sqrt(width))
        self.w_out = nn.Parameter(torch.randn(experts, 2 * width, width) / math.sqrt(2 * width))

    def forward(self, x):  # (B, T, C)
        tokens = x.reshape(-1, x.shape[-1])  # (N, C)
        prob, expert = F.softmax(self.router(tokens), dim=-1).max(dim=-1)  # (N,)
        place = (F.one_hot(expert, self.experts).cumsum(0) - 1).gather(1, expert[:, None]).squeeze(1)  # (N,)
        kept = place < self.capacity
        slot = expert * self.capacity + place.clamp(max=self.capacity - 1)  # (N,)
        index = slot[:, None].expand(-1, tokens.shape[-1])  # (N, C)
        slots = tokens.new_zeros(self.experts * self.capacity, tokens.shape[-1])
        slots = slots.scatter(0, torch.where(kept[:, None], index, 0), tokens * kept[:, None])
        hidden = F.gelu(slots.view(self.experts, self.capacity, -1) @ self.w_in)  # (E, capacity, H)
        done = (hidden @ self.w_out).view(self.experts * self.capacity, -1)  # (E*capacity, C)
        out = done.gather(0, index) * (prob * kept)[:, None]  # (N, C)
        return out.reshape(x.shape)


class MoEBlock(nn.Module):
    def __init__(self, width: int, moe: type):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)  # a token-wise stand-in for attention
        self.moe = moe(width)

    def forward(self, x):  # (B, T, C)
        x = x + self.mix(self.norm1(x))
        return x + self.moe(self.norm2(x))


class MoENet(nn.Module):
    def __init__(self, moe: type = LoopMoE, width: int = 32, depth: int = 2, vocab: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.Sequential(*[MoEBlock(width, moe) for _ in range(depth)])
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):  # (B, T)
        return self.head(self.blocks(self.embed(idx)))


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
