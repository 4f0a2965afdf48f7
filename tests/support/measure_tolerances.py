"""Measure the errors that tests/tolerances.py sets its limits from.

    TRITON_INTERPRET=1 python tests/measure_tolerances.py          # about 2 minutes on 2 CPU cores

Prints, for every kind of comparison in the table, the largest error seen over several seeds and shapes, as the
suite's assertions measure it: ``max |got - want| / max |want|`` (relative to the largest reference value).
Each reference is float64 from tests/paper.py (the paper's equations, written out without the library),
computed on the same rounded inputs as the library, so the error is the library's own arithmetic.
"""

from __future__ import annotations

import copy
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # models
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # paper, tolerances

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import mhc_rewrite  # noqa: E402
from mhc_rewrite.kernels.fused_pre import fused_pre_mix_bwd, fused_pre_mix_fwd  # noqa: E402
from mhc_rewrite.kernels.post_res import post_res_mix_bwd, post_res_mix_fwd  # noqa: E402

import paper  # noqa: E402
from models import GPT, GPTConfig, perturb_mhc  # noqa: E402
from tolerances import rel_err  # noqa: E402

mhc = torch.ops.mhc
SHAPES = [((2, 9), 4, 40), ((20,), 2, 16), ((3, 5), 3, 24), ((17,), 8, 16)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
worst: dict[str, float] = {}


def record(kind: str, err: float) -> None:
    worst[kind] = max(worst.get(kind, 0.0), err)


def record_least(kind: str, value: float) -> None:
    worst[kind] = min(worst.get(kind, float("inf")), value)


def dynamic_inputs(lead, n, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*lead, n, C, generator=g).to(dtype), torch.randn(n * C, n * n + 2 * n, generator=g) / (n * C)
            ** 0.5, 0.5 * torch.randn(3, generator=g), torch.randn(n * n + 2 * n, generator=g))


def measure_coefficients(seed):
    for lead, n, C in SHAPES:
        for dtype in DTYPES:
            X, phi, alpha, bias = dynamic_inputs(lead, n, C, dtype, seed)
            ref_in = [t.double().requires_grad_() for t in (X, phi, alpha, bias)]
            ref = paper.coefficients(*ref_in, n, 20)
            ref_y = paper.pre_mix(ref_in[0], ref[0])
            # output gradients rounded to the dtypes the library receives them in (d_y in the stream dtype)
            weights = [torch.randn(t.shape, dtype=torch.float64).to(d).double()
                       for t, d in zip((ref_y, *ref[1:]), (dtype, torch.float32, torch.float32))]
            ref_grads = torch.autograd.grad((ref_y, *ref[1:]), ref_in, weights)
            # the reference ops (CPU path) and the Triton kernels
            lib_in = [t.clone().requires_grad_() for t in (X, phi, alpha, bias)]
            h = mhc.coefficients(*lib_in, n, 20, "mhc")
            y = mhc.pre_mix(lib_in[0], h[0])
            lib_grads = torch.autograd.grad((y, *h[1:]), lib_in, [w.to(t.dtype) for w, t in zip(weights, (y, *h[1:]))])
            kernel = fused_pre_mix_fwd(X, phi, alpha, bias, None, n, 20, "mhc", block_c=16)
            kernel_grads = fused_pre_mix_bwd(X, phi, alpha, bias, kernel[1], weights[0].to(dtype), None,
                                             weights[1].float(), weights[2].float(), n, 20, "mhc", block_c=16)
            for got in (h, kernel[1:]):
                for g, w in zip(got, ref):
                    record("coefficients fp32", rel_err(g, w))
            for got_y in (y, kernel[0]):
                record(f"streams {dtype}", rel_err(got_y, ref_y))
            for got in (lib_grads, kernel_grads):
                record(f"streams {dtype}", rel_err(got[0], ref_grads[0]))
                for g, w in zip(got[1:], ref_grads[1:]):
                    record("coefficient grads fp32", rel_err(g, w))
            if dtype == torch.float32:  # float64 through the library's reference path: only the order differs
                h64 = mhc.coefficients(*[t.double() for t in (X, phi, alpha, bias)], n, 20, "mhc")
                for g, w in zip(h64, ref):
                    record("float64", rel_err(g, w))


def measure_mixing(seed):
    for lead, n, C in SHAPES:
        for dtype in DTYPES:
            for static in (False, True):
                g = torch.Generator().manual_seed(seed)
                X, f = torch.randn(*lead, n, C, generator=g).to(dtype), torch.randn(*lead, C, generator=g).to(dtype)
                coeff_lead = () if static else lead
                h_post, h_res = torch.rand(*coeff_lead, n, generator=g), torch.rand(*coeff_lead, n, n, generator=g)
                ref_in = [t.double().requires_grad_() for t in (X, f, h_post, h_res)]
                ref = paper.post_res_mix(*ref_in)
                grad = torch.randn(ref.shape, generator=g).to(dtype)
                ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
                lib_in = [t.clone().requires_grad_() for t in (X, f, h_post, h_res)]
                out = mhc.post_res_mix(*lib_in)
                lib_grads = torch.autograd.grad(out, lib_in, grad)
                kernel = post_res_mix_fwd(X, f, h_post, h_res, block_c=16)
                kernel_grads = post_res_mix_bwd(X, f, h_post, h_res, grad, block_c=16)
                for got in (out, kernel):
                    record(f"streams {dtype}", rel_err(got, ref))
                for got in (lib_grads, kernel_grads):
                    for g_, w in zip(got, ref_grads):
                        record(f"streams {dtype}", rel_err(g_, w))
                # pre-mix (static: the kernel's static mode too), forward and backward
                ref_y = paper.pre_mix(ref_in[0], ref_in[2])
                d_y = torch.randn(ref_y.shape, generator=g).to(dtype)
                ref_pre_grads = torch.autograd.grad(ref_y, (ref_in[0], ref_in[2]), d_y.double())
                y = mhc.pre_mix(lib_in[0], lib_in[2])
                record(f"streams {dtype}", rel_err(y, ref_y))
                for g_, w in zip(torch.autograd.grad(y, (lib_in[0], lib_in[2]), d_y), ref_pre_grads):
                    record(f"streams {dtype}", rel_err(g_, w))
                if static:
                    y = fused_pre_mix_fwd(X, None, None, None, h_post, n, 20, "mhc", block_c=16)[0]
                    record(f"streams {dtype}", rel_err(y, ref_y))


def log_domain_sinkhorn(logits, iters):
    """The same rounds on log M (logsumexp instead of sums): no underflow at any logit scale."""
    log_m = logits
    for _ in range(iters):
        log_m = log_m - log_m.logsumexp(dim=-2, keepdim=True)
        log_m = log_m - log_m.logsumexp(dim=-1, keepdim=True)
    return log_m.exp()


def measure_sinkhorn(seed):
    torch.manual_seed(seed)
    for n in (2, 4, 8):
        logits = torch.randn(64, n, n, dtype=torch.float64, requires_grad=True)
        ref = paper.sinkhorn(logits, 20)
        record("float64", rel_err(mhc.sinkhorn_knopp(logits, 20), ref))
        grad = torch.randn_like(ref)
        (want,) = torch.autograd.grad(ref, logits, grad)
        (got,) = torch.autograd.grad(mhc.sinkhorn_knopp(logits, 20), logits, grad)
        record("float64", rel_err(got, want))
        record("coefficients fp32", rel_err(mhc.sinkhorn_knopp(logits.detach().float(), 20), ref))
        # the unconverged columns of 20 rounds on realistic logits (identity init plus N(0, 0.5^2))
        h = mhc.sinkhorn_knopp(0.5 * torch.randn(256, n, n) + torch.eye(n), 20)
        record("sinkhorn columns after 20 rounds", (h.sum(-2) - 1).abs().max().item())
        record("sinkhorn rows fp32", (h.sum(-1) - 1).abs().max().item())
        for scale in (30.0, 100.0, 1000.0):  # extreme logits: float32 backward against float64 autograd
            big = (scale * torch.randn(64, n, n, dtype=torch.float64).clamp(-1, 1)).requires_grad_()
            grad = torch.randn(64, n, n, dtype=torch.float64)
            (want,) = torch.autograd.grad(log_domain_sinkhorn(big, 20), big, grad)
            x = big.detach().float().requires_grad_()
            (got,) = torch.autograd.grad(mhc.sinkhorn_knopp(x, 20), x, grad.float())
            record(f"sinkhorn grad fp32 at |logits| <= {scale:g}", rel_err(got, want))
            # what a log-domain float32 projection would reach (issue #12 item 4), against the same float64 autograd
            (log_got,) = torch.autograd.grad(log_domain_sinkhorn(x, 20), x, grad.float())
            record(f"log-domain sinkhorn grad fp32 at |logits| <= {scale:g}", rel_err(log_got, want))


def measure_few_roundings(seed):
    """float32 results a few roundings from an exact value."""
    torch.manual_seed(seed)
    for n in (2, 4, 8):  # exp(c·I) is balanced: diagonal e^c / (e^c + n - 1); equal logits give 1/n
        e = torch.exp(torch.tensor(1.0, dtype=torch.float64))
        exact = torch.full((n, n), 1 / (e + n - 1), dtype=torch.float64).fill_diagonal_(e / (e + n - 1))
        record("few_roundings", rel_err(mhc.sinkhorn_knopp(torch.eye(n), 20), exact))
        for scale in (1e2, 1e4):
            record("few_roundings", rel_err(mhc.sinkhorn_knopp(torch.full((n, n), scale), 20),
                                            torch.full((n, n), 1 / n)))
    for n, C in ((4, 32), (2, 16), (3, 24)):  # identity init through the kernels: copies mixed back to x
        params = mhc_rewrite.MHCSiteParams(mhc_rewrite.MHCConfig(n=n), C, site_index=1)
        x = torch.randn(6, C)
        streams = x.unsqueeze(-2).expand(6, n, C).contiguous()
        y, _, h_post, h_res = fused_pre_mix_fwd(streams, params.phi.detach(), params.alpha.detach(),
                                                params.bias.detach(), None, n, 20, "mhc")
        record("few_roundings", rel_err(y, x))
        record("few_roundings", rel_err(h_res.sum(-1), torch.ones(6, n)))
        f = torch.randn(6, C)
        out = post_res_mix_fwd(streams, f, h_post, h_res)
        record("few_roundings", rel_err(out, (x + f).unsqueeze(-2).expand(6, n, C)))


def measure_models(seed):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(n_layer=2, block_size=16))
    idx = torch.randint(0, 64, (2, 16))
    gm = mhc_rewrite.convert(gpt, example_inputs=(idx,))
    with torch.no_grad():
        record("converted vs original fp32", rel_err(gm(idx), gpt(idx)))
    perturb_mhc(gm)
    lowered = copy.deepcopy(gm)
    mhc_rewrite.lower(lowered)
    want, got = gm(idx), lowered(idx)
    record("same math fp32", rel_err(got, want))
    g_want = torch.autograd.grad(want.pow(2).mean(), list(gm.parameters()))
    g_got = torch.autograd.grad(got.pow(2).mean(), list(lowered.parameters()))
    for a, b in zip(g_got, g_want):
        record("same math fp32", rel_err(a, b))
    if seed == 0:  # compile is slow on CPU: one model
        compiled = torch.compile(copy.deepcopy(gm), backend="mhc", fullgraph=True)
        out = compiled(idx)
        record("same math fp32", rel_err(out, want))
        grads = torch.autograd.grad(out.pow(2).mean(), list(compiled.parameters()))
        for a, b in zip(grads, g_want):
            record("same math fp32", rel_err(a, b))


def measure_low_precision_training(seed):
    """bf16/fp16 training: how far the loss curve strays from the float32 run (absolute, in nats)."""
    idx = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(seed))
    curves = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for how in ("autocast", "cast"):
            torch.manual_seed(seed)
            gm = mhc_rewrite.convert(GPT(GPTConfig(n_layer=2)), example_inputs=(idx[:, :-1],))
            if how == "cast":
                gm = gm.to(dtype)
            # SGD, not Adam: Adam's second moment kept in fp16 underflows (grad² < 6e-8 becomes 0), its steps grow
            # to m/eps and the fp16 run leaves the fp32 one for reasons of the optimiser, not of the model
            opt = torch.optim.SGD(gm.parameters(), lr=0.5)
            losses = []
            for _ in range(10):
                with torch.autocast("cpu", dtype=dtype, enabled=how == "autocast" and dtype != torch.float32):
                    loss = F.cross_entropy(gm(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            curves[dtype, how] = losses
            if os.environ.get("SHOW_CURVES"):
                print(seed, dtype, how, " ".join(f"{x:.3f}" for x in losses))
    reference = curves[torch.float32, "cast"]
    for (dtype, how), losses in curves.items():
        if dtype != torch.float32:
            record(f"loss vs fp32 run {dtype} ({how}), nats",
                   max(abs(a - b) for a, b in zip(losses, reference)))
            record_least(f"loss fall {dtype} ({how}), fraction of fp32's fall",
                   (losses[0] - losses[-1]) / (reference[0] - reference[-1]))


def main():
    parts = [measure_coefficients, measure_mixing, measure_sinkhorn, measure_few_roundings, measure_models,
             measure_low_precision_training]
    chosen = [p for p in parts if not sys.argv[1:] or p.__name__ in sys.argv[1:]]  # e.g. measure_sinkhorn
    for seed in range(int(os.environ.get("SEEDS", "3"))):
        for part in chosen:
            part(seed)
    width = max(len(k) for k in worst)
    for kind, err in sorted(worst.items()):
        print(f"{kind:<{width}}  {err:.2e}")


if __name__ == "__main__":
    main()
