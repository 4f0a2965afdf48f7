"""A converted Hugging Face model stays a Hugging Face model (built from config, as loaded: cache on).

One script, per model: keyword calls; ``labels=`` gives the original's loss at init; other batch and sequence
sizes; eval deterministic and equal to the original; dropout live in train mode (same masks as the original under
one seed); ``transformers.Trainer`` trains it and moves the mHC parameters; greedy ``generate`` gives the
original's tokens; ``state_dict`` loads strictly into a fresh conversion; ``save_pretrained`` +
``mhc_rewrite.from_pretrained`` give bit-equal outputs; activation checkpointing survives conversion.
Every comparison is against the original model.
"""

import copy

import pytest
import torch

import mhc_rewrite
from mhc_rewrite.recompute import count_saved_bytes

transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")

TOL = 1e-5  # fp32 relative error of a converted model at identity init (measured 1e-7..5e-7)
VOCAB = 96


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # dropout 0.1, cache on
    return transformers.GPT2LMHeadModel(config)


def bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config)


MODELS = {"llama": llama, "gpt2": gpt2, "bert": bert}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    """(name, original, converted): the converted model shares the original's weights (not its buffers' updates:
    none of these models has running statistics)."""
    torch.manual_seed(0)
    original = MODELS[request.param]()  # train mode, as from_pretrained would not give it: the harder case
    ids = torch.randint(0, VOCAB, (2, 12))
    converted = mhc_rewrite.convert(original, n=4, example_inputs=(ids,))
    return request.param, original, converted


def _out(model, **inputs):
    out = model(**inputs)
    return out.logits


def test_the_class_and_config_stay_the_users(pair):
    name, original, converted = pair
    assert type(converted) is type(original)  # the outer class itself; only the region inside is converted
    assert converted.config.to_dict()["mhc_rewrite"]["n"] == 4 and "mhc_rewrite" not in original.config.to_dict()
    assert isinstance(converted(input_ids=torch.randint(0, VOCAB, (2, 5))), transformers.utils.ModelOutput)


def test_eval_keyword_inputs_sizes_and_labels(pair):
    name, original, converted = pair
    original.eval(), converted.eval()
    torch.manual_seed(1)
    for batch, length in ((2, 12), (5, 7), (1, 3), (3, 20)):
        ids = torch.randint(0, VOCAB, (batch, length))
        mask = torch.ones_like(ids)
        mask[0, : length // 3] = 0  # left padding in the first row
        assert rel_err(_out(converted, input_ids=ids), _out(original, input_ids=ids)) <= TOL, (batch, length)
        got = _out(converted, input_ids=ids, attention_mask=mask)
        assert rel_err(got, _out(original, input_ids=ids, attention_mask=mask)) <= TOL
        assert torch.equal(_out(converted, input_ids=ids, attention_mask=mask), got)  # eval is deterministic
    ids = torch.randint(0, VOCAB, (3, 10))
    labels = ids if name != "bert" else torch.tensor([0, 2, 1])
    want, got = original(input_ids=ids, labels=labels), converted(input_ids=ids, labels=labels)
    assert rel_err(got.loss, want.loss) <= TOL and rel_err(got.logits, want.logits) <= TOL


def test_train_mode_dropout_is_live_and_matches_the_original(pair):
    name, original, converted = pair
    original.train(), converted.train()
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.manual_seed(5)
    want = original(input_ids=ids, labels=ids if name != "bert" else torch.tensor([0, 1]))
    torch.manual_seed(5)
    got = converted(input_ids=ids, labels=ids if name != "bert" else torch.tensor([0, 1]))
    assert rel_err(got.logits, want.logits) <= TOL  # the same dropout masks: the same random numbers, in order
    if name != "llama":  # GPT-2 and BERT have dropout 0.1 (Llama's default attention dropout is 0)
        assert not torch.equal(converted(input_ids=ids).logits, got.logits)  # drawn anew at each call
    got.loss.backward()
    assert all(p.grad is not None for name_, p in converted.named_parameters() if ".mhc." in name_ and "bias" in name_)
    converted.zero_grad()


def test_greedy_generate_gives_the_originals_tokens(pair):
    name, original, converted = pair
    if name == "bert":
        pytest.skip("BERT for sequence classification does not generate")
    original.eval(), converted.eval()
    prompt = torch.randint(0, VOCAB, (1, 6))
    want = original.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)  # with its KV cache
    got = converted.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)  # without (README)
    assert torch.equal(got, want)


def test_state_dict_into_a_fresh_conversion_and_save_pretrained(pair, tmp_path):
    name, original, converted = pair
    with torch.no_grad():
        for name_, p in converted.named_parameters():
            if ".mhc." in name_:
                p.add_(0.1 * torch.randn_like(p))
    converted.eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    want = converted(input_ids=ids).logits
    fresh = mhc_rewrite.convert(copy.deepcopy(original), n=4, example_inputs=(ids,)).eval()
    assert not torch.equal(fresh(input_ids=ids).logits, want)
    fresh.load_state_dict(converted.state_dict(), strict=True)
    assert torch.equal(fresh(input_ids=ids).logits, want)
    converted.save_pretrained(tmp_path)
    loaded = mhc_rewrite.from_pretrained(type(original), tmp_path).eval()
    assert type(loaded) is type(original) and torch.equal(loaded(input_ids=ids).logits, want)


def test_trainer_trains_the_converted_model(pair, tmp_path):
    name, original, converted = pair
    ids = torch.randint(0, VOCAB, (8, 12))
    labels = ids if name != "bert" else torch.randint(0, 3, (8,))
    rows = [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=5e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1)
    before = {n: p.detach().clone() for n, p in converted.named_parameters() if ".mhc." in n}
    trainer = transformers.Trainer(model=converted, args=args, train_dataset=rows)
    trainer.train()
    moved = [n for n, p in converted.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert {n.rsplit(".", 1)[1] for n in moved} == {"phi", "alpha", "bias"}
    assert len({n.rsplit(".", 1)[0] for n in moved}) == len(converted.mhc_sites)  # every site's parameters
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def _saved(model, ids):
    with count_saved_bytes() as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.kept_bytes


def test_gradient_checkpointing_survives_conversion():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 16))
    before = llama().train()
    before.gradient_checkpointing_enable()  # enabled before conversion ...
    converted_before = mhc_rewrite.convert(before, example_inputs=(ids,))
    after = llama().train()
    converted_after = mhc_rewrite.convert(after, example_inputs=(ids,))
    converted_after.gradient_checkpointing_enable()  # ... or after it
    plain = llama().train()
    plain_bytes = _saved(plain, ids)
    plain.gradient_checkpointing_enable()
    plain_ck = _saved(plain, ids)
    streams = 2 * 4 * ids.numel() * 32 * 4  # an n-stream tensor entering each of the 2 checkpointed layers
    for converted in (converted_before, converted_after):
        converted(input_ids=ids)  # traced outside the byte count
        conv_ck = _saved(converted, ids)
        assert plain_ck < plain_bytes / 2 and conv_ck <= plain_ck + streams, (plain_ck, conv_ck, streams)
    torch.manual_seed(2)
    want = after(input_ids=ids, labels=ids).loss
    torch.manual_seed(2)
    assert rel_err(converted_after(input_ids=ids, labels=ids).loss, want) <= TOL


def test_a_strided_input_then_another_length():
    """A region first traced from a slice view (strided) must not be reused for a contiguous call (found by hand:
    torch.export's guard function failed on the next length)."""
    torch.manual_seed(0)
    original = llama().eval()
    converted = mhc_rewrite.convert(original, example_inputs=(torch.randint(0, VOCAB, (2, 8)),)).eval()
    ids = torch.randint(0, VOCAB, (4, 13))
    with torch.no_grad():
        for x in (ids[:, :12], ids):  # a strided view, then a contiguous tensor one token longer
            assert rel_err(converted(input_ids=x).logits, original(input_ids=x).logits) <= TOL


def test_save_pretrained_round_trips_when_transformers_renames_keys(tmp_path):
    """Mixtral's save-time renaming (``.mlp.`` -> ``.block_sparse_moe.``, a regular expression) also hits the mHC
    names of its expert sites (``layers_0_mlp.phi``); loading must find them under the name they were saved as."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    ids = torch.randint(0, VOCAB, (2, 8))
    converted = mhc_rewrite.convert(transformers.MixtralForCausalLM(config), n=4, example_inputs=(ids,)).eval()
    names = [name for name, _ in converted.named_parameters() if ".mhc." in name]
    assert any("mlp" in name for name in names), names  # the expert blocks have sites
    with torch.no_grad():
        for name in names:
            converted.get_parameter(name).add_(0.1 * torch.randn_like(converted.get_parameter(name)))
    want = converted(input_ids=ids).logits
    converted.save_pretrained(tmp_path)
    loaded = mhc_rewrite.from_pretrained(transformers.MixtralForCausalLM, tmp_path).eval()
    assert torch.equal(loaded(input_ids=ids).logits, want)
