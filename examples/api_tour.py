"""A tour of the public API on a small GPT: every call the docstrings show, runnable.

    python examples/api_tour.py [--compile] [--save outputs.pt]
"""

import argparse
import copy
import os
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nanogpt import GPT, GPTConfig  # noqa: E402

import mhc_rewrite  # noqa: E402
from mhc_rewrite.inspect import block_code, sites_table  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile through the mhc backend (slow on CPU)")
    parser.add_argument("--save", help="write the losses, gains and outputs to this file (torch.save)")
    args = parser.parse_args()
    saved = {"losses": []}
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_embd=32, block_size=32))
    idx = torch.randint(0, 256, (4, 33))

    # 1. what would be rewritten
    print(sites_table(mhc_rewrite.find_residuals(model)))

    # 2. convert, with options
    config = mhc_rewrite.MHCConfig(n=4, dynamic=True, mode="mhc", init="identity")
    converted = mhc_rewrite.convert(model, config=config, filter_fn=lambda site: site.has_params)  # still a GPT
    print("\n" + str(mhc_rewrite.explain(converted)).splitlines()[0])
    print("\nblock h.0 after the rewrite (first lines):")
    graph = mhc_rewrite.converted_graph(converted, idx[:, :-1])  # the graph it runs for such inputs, this mode
    print("\n".join(block_code(graph, "h.0").splitlines()[:6]))

    # 3. train a few steps, storing only every few streams for backward
    opt = torch.optim.AdamW(converted.parameters(), lr=3e-3)
    for step in range(3):
        with mhc_rewrite.recompute_streams(converted):
            loss = F.cross_entropy(converted(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        saved["losses"].append(loss.item())
        print(f"step {step} loss {loss.item():.3f}")

    # 4. look at the streams
    forward, backward = mhc_rewrite.stream_diagnostics(converted, idx[:, :-1]).max_gain()
    print(f"Amax gain of the composite residual map: forward {forward:.4f}, backward {backward:.4f}")
    saved["gain"] = (forward, backward)

    # 5. the fused ops without compiling (Triton kernels on CUDA, their reference on CPU): the same outputs
    lowered = mhc_rewrite.lower(copy.deepcopy(converted))
    saved["lowered"], saved["eager"] = lowered(idx[:, :-1]).detach(), converted(idx[:, :-1]).detach()
    print("lowered output matches:", torch.allclose(saved["lowered"], saved["eager"], atol=1e-5))

    # 5b. pipeline stages (one per rank under torch.distributed.pipelining: examples/distributed_train.py); chained
    # here in one process, they compute the model: the n-stream tensor crosses the boundary
    first, second = mhc_rewrite.split_stages(converted, idx[:, :-1], ["h.2"])
    streams = first(idx[:, :-1])
    print(f"stage 0 sends the streams {tuple(streams.shape)}; stage 1 holds {len(second.state_dict())} tensors")
    saved["staged"] = second(streams).detach()

    # 6. compile: lowers the mHC ops to the fused Triton kernels (CUDA) and compiles with Inductor
    if args.compile:
        compiled = torch.compile(converted, backend="mhc", fullgraph=True)
        saved["compiled"] = compiled(idx[:, :-1]).detach()
        print("compiled output matches:", torch.allclose(saved["compiled"], saved["eager"], atol=1e-5))
    if args.save:
        torch.save(saved, args.save)


if __name__ == "__main__":
    main()
