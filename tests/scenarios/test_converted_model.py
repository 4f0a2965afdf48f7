"""A converted model is the user's model: train/eval, keyword inputs, aliasing, batch sizes, dtypes, checkpointing,
pickling, meta-device init and bad inputs behave as in the original (issue: the converted model is the user's).

Every test compares the converted model with the original: outputs, losses, gradients, dropout masks (same RNG
seed: the converted graph draws the same random numbers in the same order), batch-norm running statistics.
"""

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import mhc_rewrite
from mhc_rewrite.recompute import count_saved_bytes

from models import GPT, GPTConfig, ResNetish
from tolerances import assert_close

# --- models that decide in Python at call time --------------------------------------------------------------


class DropoutAttention(nn.Module):
    """nanoGPT's attention: ``dropout_p=self.dropout if self.training else 0.0``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.n_head, self.dropout = n_head, dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, C)
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).flatten(-2)))


class DropoutGPT(nn.Module):
    """A nanoGPT with dropout everywhere and ``targets=`` giving the loss, as nanoGPT's ``forward(idx, targets)``."""

    def __init__(self, vocab: int = 64, n_embd: int = 32, n_layer: int = 2, dropout: float = 0.2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(32, n_embd)
        self.drop = nn.Dropout(dropout)
        self.ln1 = nn.ModuleList([nn.LayerNorm(n_embd) for _ in range(n_layer)])
        self.attn = nn.ModuleList([DropoutAttention(n_embd, 2, dropout) for _ in range(n_layer)])
        self.ln2 = nn.ModuleList([nn.LayerNorm(n_embd) for _ in range(n_layer)])
        self.mlp = nn.ModuleList([nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                                nn.Dropout(dropout)) for _ in range(n_layer)])
        self.ln_f, self.head = nn.LayerNorm(n_embd), nn.Linear(n_embd, vocab)

    def forward(self, idx, targets=None):  # (B, T) token ids
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for ln1, attn, ln2, mlp in zip(self.ln1, self.attn, self.ln2, self.mlp):
            x = x + attn(ln1(x))
            x = x + mlp(ln2(x))
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class DropPath(nn.Module):
    """timm-style stochastic depth: ``if not self.training: return x``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep / (1 - self.p)


class DropPathMLP(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3, p: float = 0.3):
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(depth)])
        self.fcs = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.drop_path = DropPath(p)

    def forward(self, x):  # (B, 6)
        x = self.embed(x)
        for norm, fc in zip(self.norms, self.fcs):
            x = x + self.drop_path(fc(norm(x)))
        return x


def _dropout_gpt():
    return DropoutGPT(), torch.randint(0, 64, (4, 16))


def _drop_path():
    return DropPathMLP(), torch.randn(8, 6)


def _resnet_bn():
    return ResNetish(), torch.randn(4, 3, 8, 8)


CASES = {"nanogpt_dropout": _dropout_gpt, "drop_path": _drop_path, "resnet_batchnorm": _resnet_bn}


@pytest.mark.parametrize("case", CASES)
def test_train_and_eval_behave_like_the_original(case):
    torch.manual_seed(0)
    original, x = CASES[case]()
    converted = mhc_rewrite.convert(copy.deepcopy(original), n=4, example_inputs=(x,))  # a copy: BN stats apart
    assert isinstance(converted, type(original))
    for mode in ("train", "eval", "train"):
        original.train(mode == "train")
        converted.train(mode == "train")
        torch.manual_seed(1)
        want = original(x)
        torch.manual_seed(1)
        got = converted(x)
        assert_close(got, want, "function_at_init", msg=str(mode))  # same dropout masks, same batch statistics
        if mode == "eval":
            assert torch.equal(converted(x), got)  # eval is deterministic
        else:
            again, _ = converted(x), original(x)  # both: batch-norm statistics stay in step
            assert not torch.equal(again, got) or case == "resnet_batchnorm"  # dropout is live
    for want, got in zip(original.buffers(), converted.buffers()):  # BatchNorm running statistics updated alike
        assert_close(got.float(), want.float(), "function_at_init")


def test_gradients_of_the_original_parameters_are_the_originals():
    torch.manual_seed(0)
    original, x = _dropout_gpt()
    converted = mhc_rewrite.convert(copy.deepcopy(original), n=4)
    for model in (original, converted):
        torch.manual_seed(3)
        model(x, targets=x).backward()
    mhc = {name for name, _ in converted.named_parameters() if name.startswith("mhc.")}
    grads = dict(converted.named_parameters())
    for name, p in original.named_parameters():
        assert_close(grads[name].grad, p.grad, "same_math", msg=name)  # float32 sums of a different shape
    assert all(grads[name].grad is not None for name in mhc)


def test_keyword_inputs_and_optional_arguments():
    torch.manual_seed(0)
    original, x = _dropout_gpt()
    original.eval()
    converted = mhc_rewrite.convert(original, n=4).eval()
    assert_close(converted(x, targets=x), original(x, targets=x), "function_at_init")  # loss
    assert_close(converted(idx=x), original(idx=x), "function_at_init")  # logits, by keyword
    assert_close(converted(x, None), original(x), "function_at_init")
    y = torch.roll(x, 1, dims=1)
    assert_close(converted(idx=x, targets=y), original(x, y), "function_at_init")


class TwoInputs(nn.Module):
    """Reads both inputs after a Python-level size check (so it is traced with torch.export)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
        self.head = nn.Linear(16, 64)

    def forward(self, input_ids, labels):
        batch, length = input_ids.shape  # Python ints: symbolic_trace fails, export traces
        x = self.emb(input_ids)
        for block in self.blocks:
            x = x + block(torch.tanh(x))
        return F.cross_entropy(self.head(x).reshape(batch * length, -1), labels.reshape(-1))


def test_aliased_example_inputs_do_not_bake_the_alias():
    torch.manual_seed(0)
    model = TwoInputs()
    ids = torch.randint(0, 64, (2, 8))
    converted = mhc_rewrite.convert(model, example_inputs={"input_ids": ids, "labels": ids})  # one tensor, twice
    other = torch.randint(0, 64, (2, 8))
    assert_close(converted(input_ids=ids, labels=other), model(ids, other), "function_at_init")
    assert_close(converted(input_ids=ids, labels=ids), model(ids, ids), "function_at_init")


def test_batch_of_one_example_does_not_pin_the_batch_size():
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()  # `B, T = idx.size()`: traced with torch.export
    converted = mhc_rewrite.convert(model, example_inputs=(torch.randint(0, 64, (1, 8)),))
    for shape in ((1, 8), (8, 8), (3, 5), (1, 1)):
        x = torch.randint(0, 64, shape)
        assert_close(converted(x), model(x), "function_at_init", msg=str(shape))


def test_dtype_after_to_is_a_new_specialisation():
    torch.manual_seed(0)
    original, x = _drop_path()
    original.eval()
    converted = mhc_rewrite.convert(copy.deepcopy(original), example_inputs=(x,)).eval()
    converted(x)
    converted.double()
    want = original.double()(x.double())
    got = converted(x.double())
    assert got.dtype == torch.float64
    assert_close(got, want, "float64_model", torch.float64)  # float64 end to end


class CheckpointedStack(nn.Module):
    """User code checkpointing each block: ``x = checkpoint(block, x)``."""

    def __init__(self, width: int = 32, depth: int = 4):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in range(depth)])
        self.ups = nn.ModuleList([nn.Linear(width, 4 * width) for _ in range(depth)])
        self.downs = nn.ModuleList([nn.Linear(4 * width, width) for _ in range(depth)])
        self.use_checkpoint = True

    def block(self, i, x):
        return x + self.downs[i](F.gelu(self.ups[i](self.norms[i](x))))

    def forward(self, x):  # (T, C)
        for i in range(len(self.norms)):
            x = checkpoint(self.block, i, x, use_reentrant=False) if self.use_checkpoint else self.block(i, x)
        return x


def _saved_bytes(model, x):
    with count_saved_bytes() as counter:
        model(x).sum().backward()
    return counter.kept_bytes


def test_checkpointed_blocks_stay_checkpointed():
    torch.manual_seed(0)
    original = CheckpointedStack()
    x = torch.randn(64, 32, requires_grad=True)
    converted = mhc_rewrite.convert(copy.deepcopy(original), n=4)
    assert_close(converted(x), original(x), "function_at_init")
    converted(x)  # traced outside the byte count
    plain_ck, conv_ck = _saved_bytes(original, x), _saved_bytes(converted, x)
    original.use_checkpoint = converted.use_checkpoint = False
    plain, conv = _saved_bytes(original, x), _saved_bytes(converted, x)
    streams = 4 * 4 * x.numel() * 4  # one n-stream tensor entering each of the 4 checkpointed blocks
    assert plain_ck < plain and conv_ck < conv / 3  # checkpointing is on in both
    assert conv_ck <= plain_ck + streams, (plain_ck, conv_ck, streams)


def test_torch_save_pickle_and_deepcopy_keep_the_conversion(tmp_path):
    torch.manual_seed(0)
    original, x = _drop_path()
    converted = mhc_rewrite.convert(original, example_inputs=(x,)).eval()
    with torch.no_grad():
        for p in converted.mhc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    want = converted(x)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    for copy_ in (torch.load(buffer, weights_only=False), copy.deepcopy(converted)):
        assert torch.equal(copy_(x), want)
        assert [s.module_path for s in copy_.mhc_sites] == [s.module_path for s in converted.mhc_sites]
        with pytest.raises(mhc_rewrite.MHCRewriteError, match="already converted"):
            mhc_rewrite.convert(copy_)


def test_torch_load_in_a_fresh_process(tmp_path):
    """A whole pickled model and a weights-only state dict, each loaded by a new interpreter."""
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    x = torch.randint(0, 64, (2, 8))
    converted = mhc_rewrite.convert(model, example_inputs=(x,)).eval()
    with torch.no_grad():
        for p in converted.mhc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(converted, tmp_path / "model.pt")
    torch.save(converted.state_dict(), tmp_path / "state.pt")
    torch.save({"x": x, "y": converted(x)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parents[1] / "support")!r})
        import mhc_rewrite
        from models import GPT, GPTConfig
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=True)
        whole = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False).eval()
        assert torch.equal(whole(io["x"]), io["y"])
        fresh = mhc_rewrite.convert(GPT(GPTConfig()), example_inputs=(io["x"],)).eval()
        fresh.load_state_dict(torch.load({str(tmp_path / "state.pt")!r}, weights_only=True), strict=True)
        assert torch.equal(fresh(io["x"]), io["y"])
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_meta_device_to_empty_and_reset_parameters():
    with torch.device("meta"):
        model = DropPathMLP()
    model.eval()  # DropPath is the identity in eval mode: symbolic_trace needs no example inputs
    converted = mhc_rewrite.convert(model, n=4)
    converted.to_empty(device="cpu")
    torch.manual_seed(0)
    for module in converted.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    x = torch.randn(8, 6)
    got = converted(x)
    assert torch.isfinite(got).all()
    assert_close(got, model(x), "function_at_init")  # the original shares every parameter with the converted copy
    site = converted.mhc[next(iter(converted.mhc.keys()))]
    assert torch.equal(site.alpha, torch.zeros(3)) and site.phi.abs().max() > 0  # identity init, fresh phi
    h_pre = torch.sigmoid(site.bias[:4].double())
    assert_close(h_pre.sum(), torch.tensor(1.0), "few_roundings")


def test_converting_a_cpu_model_while_the_default_device_is_meta():
    """The identity-init bias is computed on the CPU whatever the default device: under a meta default it used to
    hold no values to copy into the CPU parameters (NotImplementedError at convert)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 32, (2, 8))
    with torch.device("meta"):
        converted = mhc_rewrite.convert(model, example_inputs=(idx,))
    assert all(p.device.type == "cpu" for p in converted.parameters())
    for train in (True, False):
        model.train(train), converted.train(train)
        want, got = model(idx), converted(idx)
        assert_close(got, want, "function_at_init", msg=f"train={train}")
    F.cross_entropy(got.flatten(0, 1), idx.flatten()).backward()
    site_biases = [p for name, p in converted.named_parameters() if name.startswith("mhc.") and name.endswith(".bias")]
    assert len(site_biases) == 4 and all(p.grad is not None for p in site_biases)  # 2 layers x (attention, MLP)


def test_example_inputs_the_model_cannot_run_carry_its_own_message():
    model = GPT(GPTConfig(block_size=8)).eval()
    for bad in (torch.rand(2, 8), torch.randint(0, 64, (2, 12))):  # float ids; longer than the position table
        with pytest.raises(Exception) as direct:
            model(bad)
        with pytest.raises(mhc_rewrite.MHCRewriteError) as converting:
            mhc_rewrite.convert(model, example_inputs=(bad,))
        assert str(direct.value) in str(converting.value)


def test_state_dict_loads_strictly_into_a_fresh_conversion():
    torch.manual_seed(0)
    original, x = _dropout_gpt()
    converted = mhc_rewrite.convert(original).eval()
    with torch.no_grad():
        for p in converted.mhc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fresh = mhc_rewrite.convert(copy.deepcopy(original)).eval()
    assert not torch.equal(fresh(x), converted(x))
    fresh.load_state_dict(converted.state_dict(), strict=True)
    assert torch.equal(fresh(x), converted(x))
