"""Train a converted GPT under torch.distributed (CPU, gloo), checkpoint mid-run, resume, and compare.

    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --wrap ddp --out /tmp/ddp
    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --wrap fsdp --out /tmp/fsdp
    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --wrap pipeline --out /tmp/pp
    torchrun --standalone --nproc_per_node 2 examples/distributed_train.py --wrap fsdp --model llama --out /tmp/hf

Every rank builds the same model (same seed), converts it with mhc_rewrite, wraps it (DDP, or FSDP2's
``fully_shard``) and trains on its half of each global batch. With ``--wrap pipeline`` the converted model is cut
into one stage per rank (``mhc_rewrite.split_stages``: the n-stream tensor crosses the boundary), each wrapped in
``torch.distributed.pipelining.PipelineStage``, and ``ScheduleGPipe`` (``--schedule 1f1b``: ``Schedule1F1B``) runs
every global batch as 4 micro-batches;
each rank saves the gradients of its stage at the first step (``first_grads_rank<r>.pt``).

At ``--ckpt-at`` the model and optimizer are saved with ``torch.distributed.checkpoint``; the run goes on
uninterrupted. Then a fresh model (another seed) loads the checkpoint and trains the remaining steps again. Rank 0
writes ``results.json`` (both loss curves) and, for DDP and FSDP2, the gradients of the first step
(``first_grads.pt``, FSDP2's gathered from their shards) so that they can be compared with one process on the full
batch.
``--model llama --wrap fsdp`` does the same with a small Hugging Face Llama (from its config), converted, then
sharded with FSDP2 per decoder layer and at the root, in mixed precision (bf16 parameters, fp32 gradient reduction).
"""

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nanogpt import GPT, GPTConfig  # noqa: E402

import mhc_rewrite  # noqa: E402

CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
GLOBAL_BATCH = 8
MICRO_BATCHES = 4


def build(seed: int, model: str = "gpt"):
    """The converted model every run starts from (also used by the tests for the one-process reference): the GPT
    above, or (``model="llama"``) a small Hugging Face Llama from its config (random weights, nothing downloaded)."""
    torch.manual_seed(seed)
    if model == "gpt":
        return mhc_rewrite.convert(GPT(CONFIG), n=4)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.n_embd, intermediate_size=2 * CONFIG.n_embd,
                         num_hidden_layers=CONFIG.n_layer, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=CONFIG.block_size, use_cache=False)
    local_batch = global_batch(0)[0][: GLOBAL_BATCH // 2]  # what one of 2 ranks sees
    return mhc_rewrite.convert(LlamaForCausalLM(config), n=4, example_inputs={"input_ids": local_batch})


def global_batch(step: int):
    """Counting sequences (t, t+1, ... mod vocab) from random starts: learnable in a few steps."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, CONFIG.vocab_size, (GLOBAL_BATCH, 1), generator=g)
    seq = (start + torch.arange(CONFIG.block_size + 1)) % CONFIG.vocab_size
    return seq[:, :-1], seq[:, 1:]


def loss_on(model, x, y):
    output = model(x)
    logits = output.logits if hasattr(output, "logits") else output  # a Hugging Face model returns an output object
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # float32 loss (bf16 logits under FSDP2's
    # mixed precision: a bf16 loss would round the curves to 3 digits)


def train(model, opt, steps, rank, world, on_step=None):
    losses = []
    for step in steps:
        x, y = global_batch(step)
        part = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        loss = loss_on(model, x[part], y[part])
        opt.zero_grad()
        loss.backward()
        if on_step is not None:
            on_step(step)
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def pipeline_stage(model, rank, world):
    """This rank's stage of ``model`` (stage boundaries at the blocks ``h.<k>`` that split the blocks evenly)."""
    from torch.distributed.pipelining import PipelineStage

    boundaries = [f"h.{k * CONFIG.n_layer // world}" for k in range(1, world)]
    micro_batch = global_batch(0)[0][: GLOBAL_BATCH // MICRO_BATCHES]
    module = mhc_rewrite.split_stages(model, micro_batch, boundaries)[rank]
    return module, PipelineStage(module, rank, world, torch.device("cpu"))


def pipeline_losses(output, target):
    return F.cross_entropy(output.flatten(0, 1), target.flatten())


def train_pipeline(stage, opt, steps, rank, world, on_step=None, schedule_name="gpipe"):
    """Every rank runs its stage on the whole global batch, as ``MICRO_BATCHES`` micro-batches (GPipe or 1F1B); the
    last stage computes the loss of each micro-batch (their mean is the full batch's loss), broadcast to every rank."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
    schedule = kind(stage, n_microbatches=MICRO_BATCHES, loss_fn=pipeline_losses)
    losses = []
    for step in steps:
        x, y = global_batch(step)
        micro = []
        opt.zero_grad()
        if rank == 0:
            schedule.step(x)
        elif rank == world - 1:
            schedule.step(target=y, losses=micro)
        else:
            schedule.step()
        if on_step is not None:
            on_step(step)
        opt.step()
        mean = torch.stack(micro).mean().detach() if rank == world - 1 else torch.zeros(())
        dist.broadcast(mean, src=world - 1)
        losses.append(mean.item())
    return losses


def wrap(model, how, param_dtype=torch.bfloat16):
    if how == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if hasattr(model, "model") and hasattr(model.model, "layers"):  # Hugging Face: per layer, then the root
        # Each decoder layer is its own unit; the converted region (model.model) gathers the units inside it at
        # its call (its graph does not call the layers as modules: mhc_rewrite/sharding.py). The mHC parameters
        # (model.model.mhc.*) belong to the root unit and are sharded like every other parameter.
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    # The GPT is sharded at its root, as one unit (its float32 losses then equal DDP's, bitwise on CPU).
    fully_shard(model)
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wrap", choices=("ddp", "fsdp", "pipeline"), default="ddp")
    parser.add_argument("--model", choices=("gpt", "llama"), default="gpt",
                        help="the in-repo GPT, or a small Hugging Face Llama from its config (with --wrap fsdp)")
    parser.add_argument("--param-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="FSDP2's param_dtype for the Llama (reduce_dtype is float32)")
    parser.add_argument("--schedule", choices=("gpipe", "1f1b"), default="gpipe",
                        help="the pipeline schedule (ScheduleGPipe or Schedule1F1B), with --wrap pipeline")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--ckpt-at", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    stages = {}  # --wrap pipeline: the PipelineStage of each stage module

    def make(seed):
        if args.wrap != "pipeline":
            return wrap(build(seed, args.model), args.wrap, getattr(torch, args.param_dtype))
        module, stage = pipeline_stage(build(seed), rank, world)
        stages[module] = stage
        return module

    def train_run(module, optimizer, steps, on_step=None):
        if args.wrap == "pipeline":
            return train_pipeline(stages[module], optimizer, steps, rank, world, on_step, args.schedule)
        return train(module, optimizer, steps, rank, world, on_step)

    model = make(seed=0)
    # Pipeline stages hold different parameters: the optimizer's param_groups are keyed by parameter name (a plain
    # list would be saved once, by rank 0, and be wrong for the other stages).
    options = StateDictOptions(flatten_optimizer_state_dict=args.wrap == "pipeline")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def on_step(step):
        if step == 0 and args.wrap == "ddp" and rank == 0:
            torch.save({name: p.grad.clone() for name, p in model.module.named_parameters()}, out / "first_grads.pt")
        if step == 0 and args.wrap == "fsdp":  # every rank takes part in gathering the shards of each gradient
            grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
            if rank == 0:
                torch.save(grads, out / "first_grads.pt")
        if step == 0 and args.wrap == "pipeline":
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            torch.save(grads, out / f"first_grads_rank{rank}.pt")

    # what every parameter is after wrapping (FSDP2: a DTensor sharded on dim 0), mHC parameters included
    sharded = {name: f"{type(p).__name__}{list(getattr(p, 'placements', ()))}" for name, p in model.named_parameters()}
    units = [name for name, m in model.named_modules() if type(m).__name__.startswith("FSDP")]  # fully_shard's
    first = train_run(model, opt, range(args.ckpt_at), on_step)
    model_state, opt_state = get_state_dict(model, opt, options=options)
    dcp.save({"model": model_state, "optim": opt_state}, checkpoint_id=str(out / "checkpoint"))
    uninterrupted = first + train_run(model, opt, range(args.ckpt_at, args.steps))

    fresh = make(seed=1)  # other weights: everything must come from the checkpoint
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    model_state, opt_state = get_state_dict(fresh, fresh_opt, options=options)
    state = {"model": model_state, "optim": opt_state}
    dcp.load(state, checkpoint_id=str(out / "checkpoint"))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    resumed = train_run(fresh, fresh_opt, range(args.ckpt_at, args.steps))
    if rank == 0:
        (out / "results.json").write_text(json.dumps({"wrap": args.wrap, "model": args.model, "world": world,
                                                      "param_dtype": args.param_dtype,
                                                      "sharded": sharded, "units": units,
                                                      "uninterrupted": uninterrupted, "resumed": resumed}))
        print(f"{args.wrap}: losses {[round(v, 4) for v in uninterrupted]}; "
              f"after resuming at step {args.ckpt_at}: {[round(v, 4) for v in resumed]}")
    # Release the wrapped models while every rank is still here: a DDP reducer freed after destroy_process_group
    # (at function exit) joins gloo threads that may wait on a rank that has already left (seen: rank 0 hung at exit).
    dist.barrier()
    model = fresh = opt = fresh_opt = None
    stages.clear()
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
