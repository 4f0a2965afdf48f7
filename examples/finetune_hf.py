"""Fine-tune a converted Hugging Face causal LM with ``transformers.Trainer``, save it, load it back, generate.

    python examples/finetune_hf.py [--steps 40] [--out out/finetune]

A Llama built from its config (random weights, default config: key-value cache on) is converted to mHC as it is,
fine-tuned with the stock ``Trainer`` on byte-level text of the Python standard library (``labels=input_ids``: the
model computes its own loss), saved with its own ``save_pretrained``, loaded back with
``mhc_rewrite.from_pretrained``, and asked to continue a prompt. ``results.json`` records the losses, the prompt
and the tokens the trained model generated before saving, so that the reload can be checked independently.
"""

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import mhc_rewrite

SEQ = 64


def stdlib_bytes(limit: int = 400_000) -> bytes:
    """Source text shipped with Python itself: no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = b""
    for path in sorted(root.glob("*.py")):
        text += path.read_bytes()
        if len(text) >= limit:
            break
    return text[:limit]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="Trainer steps (default 40)")
    parser.add_argument("--out", default="out/finetune", help="where the model and results.json go")
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config)  # as loaded: use_cache=True
    data = torch.tensor(list(stdlib_bytes()), dtype=torch.long)
    chunks = data[: len(data) // SEQ * SEQ].view(-1, SEQ)
    rows = [{"input_ids": chunk, "labels": chunk} for chunk in chunks]

    start = time.perf_counter()
    model = mhc_rewrite.convert(model, n=4, example_inputs=(chunks[:2],))
    print(f"converted {len(model.mhc_sites)} residual sites in {time.perf_counter() - start:.1f} s; "
          f"still a {type(model).__name__}")

    training = TrainingArguments(output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=8,
                                 learning_rate=3e-3, warmup_steps=min(5, args.steps // 4), logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=rows)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"Trainer: loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")

    model.eval()
    prompt = chunks[-1][:24].unsqueeze(0)
    generated = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    model.save_pretrained(out / "model")
    loaded = mhc_rewrite.from_pretrained(LlamaForCausalLM, out / "model").eval()
    again = loaded.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
    print(f"saved to {out / 'model'} and loaded back: generate gives "
          f"{'the same' if torch.equal(again, generated) else 'DIFFERENT'} tokens")
    print("prompt:    ", bytes(prompt[0].tolist()).decode("utf-8", "replace"))
    print("continued: ", bytes(generated[0, prompt.shape[1]:].tolist()).decode("utf-8", "replace"))
    (out / "results.json").write_text(json.dumps({
        "losses": losses, "prompt": prompt[0].tolist(), "generated": generated[0].tolist(),
        "sites": len(model.mhc_sites),
    }, indent=1))


if __name__ == "__main__":
    main()
