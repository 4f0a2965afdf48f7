"""A converted model generates with the key-value cache (issue 22), compared against the original model.

Per model (Llama with multi-head attention, a GQA Llama, a sliding-window Mistral, the T5 encoder-decoder): the
prefill and 3 decoding steps give the original's logits (fp32, relative error <= 1e-5) and leave the caller's cache
equal to the one the original fills; greedy ``generate`` gives the original's tokens with at most 2 traces; beam
search gives the original's sequences; a cache filled by the original continues in the converted model.
"""

import copy

import pytest
import torch

import mhc_rewrite
from mhc_rewrite.region import region_state

transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers")

TOL = 1e-5  # fp32 relative error of a converted model at identity init (measured ~2e-7 here)
VOCAB = 96


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def llama(kv_heads=4):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config)


def mistral(window=4):  # a window of 4 tokens: the prompt (6) and the decoding steps run past it
    config = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                                        max_position_embeddings=128)
    return transformers.MistralForCausalLM(config)


def t5():
    config = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(config)


MODELS = {"llama": llama, "llama_gqa": lambda: llama(kv_heads=2), "mistral_sliding": mistral, "t5": t5}
# Every model's decoding graph serves every length. The sliding-window Mistral's token count, a plain int of the
# cache, enters the graph as a symbolic int (kv_cache.py's counters); T5's first decoding step reads a one-token
# self-attention cache, whose length the export keeps free (kv_cache.dynamic_shapes)


def build(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    ids = torch.randint(3, VOCAB, (2, 6))
    example = {"input_ids": ids, "decoder_input_ids": ids[:, :3]} if name == "t5" else {"input_ids": ids}
    return model, mhc_rewrite.convert(model, n=4, example_inputs=example), ids


def step_inputs(name, ids, tokens, cache):
    if name == "t5":
        return {"input_ids": ids, "decoder_input_ids": tokens, "cache": cache, "use_cache": True}
    return {"input_ids": tokens, "cache": cache, "use_cache": True}


def cache_tensors(cache):
    caches = [cache.self_attention_cache, cache.cross_attention_cache] if hasattr(cache, "cross_attention_cache") \
        else [cache]
    return [t for c in caches for layer in c.layers for t in (layer.keys, layer.values)]


def assert_same_cache(got, want):
    assert type(got) is type(want) and got.get_seq_length() == want.get_seq_length()
    pairs = list(zip(cache_tensors(got), cache_tensors(want), strict=True))
    assert pairs and all(g.shape == w.shape and rel_err(g, w) <= TOL for g, w in pairs)


@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_and_decode_steps_match_the_original(name):
    model, converted, ids = build(name)
    torch.manual_seed(1)
    tokens = [ids[:, :3] if name == "t5" else ids] + [torch.randint(3, VOCAB, (2, 1)) for _ in range(3)]
    want_cache = got_cache = None
    with torch.no_grad():
        for i, step in enumerate(tokens):
            want = model(**step_inputs(name, ids, step, want_cache))
            got = converted(**step_inputs(name, ids, step, got_cache))
            want_cache, got_cache = want.past_key_values, got.past_key_values
            assert rel_err(got.logits, want.logits) <= TOL, f"step {i}"
            assert_same_cache(got_cache, want_cache)
    assert region_state(converted).traces <= 2  # one prefill, one decoding graph


@pytest.mark.parametrize("name", ["llama", "llama_gqa", "mistral_sliding", "t5"])
def test_greedy_generate_gives_the_original_tokens(name):
    model, converted, ids = build(name)
    mask = torch.ones_like(ids)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    before = region_state(converted).traces
    got = converted.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    assert region_state(converted).traces - before <= 2  # one prefill, one decoding graph, whatever the length
    again = region_state(converted).traces
    assert torch.equal(converted.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False),
                       model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False))
    assert region_state(converted).traces == again


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_a_sliding_window_that_fills_while_generating_takes_a_few_graphs_not_one_per_token(cache_implementation):
    """A window of 12 tokens, a prompt of 6, 16 new tokens: the window's token count is a symbolic int whose range
    each graph checks. A DynamicCache takes at most 5 graphs: prefill, inside the window, the two steps at its edge
    (where the layer's slice to its last 11 tokens turns from a no-op into a cut, a decision torch.export fixes),
    past it; a StaticCache 3. A longer generate then traces nothing."""
    torch.manual_seed(0)
    model = mistral(window=12).eval()
    ids = torch.randint(3, VOCAB, (2, 6))
    converted = mhc_rewrite.convert(model, n=4, example_inputs={"input_ids": ids})
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                  cache_implementation=cache_implementation)
    want = model.generate(ids, **kwargs)
    before = region_state(converted).traces
    assert torch.equal(converted.generate(ids, **kwargs), want)
    assert region_state(converted).traces - before <= (5 if cache_implementation is None else 3)
    again = region_state(converted).traces
    kwargs["max_new_tokens"] = 20
    assert torch.equal(converted.generate(ids, **kwargs), model.generate(ids, **kwargs))
    assert region_state(converted).traces == again


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_another_prompt_length_reuses_the_graphs(name):
    """The prefill graph keeps the prompt's length free (an empty cache's empty tensor list, and T5's encoder output,
    a ModelOutput, once made torch.export fix every size), so a longer prompt traces nothing new."""
    model, converted, ids = build(name)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    converted.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    traces = region_state(converted).traces
    longer = torch.randint(3, VOCAB, (2, 9))
    want = model.generate(longer, attention_mask=torch.ones_like(longer), **kwargs)
    assert torch.equal(converted.generate(longer, attention_mask=torch.ones_like(longer), **kwargs), want)
    assert region_state(converted).traces == traces


def test_a_one_token_prompt_decodes_with_the_graph_of_longer_ones():
    """After a one-token prompt the first decoding step reads a one-token cache: the decoding graph traced from a
    six-token prompt serves it (the cached length is free at 1 too); only the one-token prefill is new."""
    model, converted, ids = build("llama")
    kwargs = dict(max_new_tokens=5, do_sample=False)
    converted.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    traces = region_state(converted).traces
    one = ids[:, :1]
    want = model.generate(one, attention_mask=torch.ones_like(one), **kwargs)
    assert torch.equal(converted.generate(one, attention_mask=torch.ones_like(one), **kwargs), want)
    assert region_state(converted).traces == traces + 1


def test_a_graph_runs_only_where_its_symbolic_int_was_traced_for():
    """``static_sizes`` reads an int input's range off the exported graph (here ``n >= 4``, the branch the Python
    took) for ``sizes_match``; ``guards_hold`` checks the graph's other guards (``n != 4``: the slice was traced as
    not starting at 0). Where both hold, the graph computes what the module does; elsewhere the region re-traces."""
    from mhc_rewrite.specialisation import guards_hold, sizes_match, static_sizes

    class Window(torch.nn.Module):
        def forward(self, x, n):
            return x[:, n - 4:] * 2 if n >= 4 else x[:, :n] + 1

    x = torch.randn(2, 10)
    dims = {"x": {1: torch.export.Dim.AUTO}, "n": torch.export.Dim.AUTO}
    gm = torch.export.export(Window(), (x, 6), dynamic_shapes=dims, strict=False).module()
    fixed = static_sizes(gm, (x, 6), {})
    assert (1, None, (4, None)) in fixed
    for n in (5, 7, 10):
        assert sizes_match(fixed, (x, n), {}) and guards_hold(gm, (x, n), {})
        assert torch.equal(gm(x, n), Window()(x, n))
    assert not sizes_match(fixed, (x, 3), {}) and not guards_hold(gm, (x, 3), {})
    assert sizes_match(fixed, (x, 4), {}) and not guards_hold(gm, (x, 4), {})


def test_generate_uses_the_cache():
    model, converted, ids = build("llama")
    mask = torch.ones_like(ids)
    converted.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # traced here, not counted
    lengths = []
    hook = converted.model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    converted.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    hook.remove()
    assert lengths == [6, 1, 1, 1]  # decoding steps feed one token: the past comes from the cache


def test_beam_search_gives_the_original_sequences():
    model, converted, ids = build("llama")
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=3, do_sample=False,
                  num_return_sequences=2, early_stopping=True)
    want = model.generate(ids, **kwargs)
    got = converted.generate(ids, **kwargs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_a_cache_filled_by_the_original_continues_in_the_converted_model(name):
    model, converted, ids = build(name)
    with torch.no_grad():
        prefix = ids[:, :3] if name == "t5" else ids
        filled = model(**step_inputs(name, ids, prefix, None)).past_key_values
        shared = copy.deepcopy(filled)
        nxt = torch.randint(3, VOCAB, (2, 1))
        want = model(**step_inputs(name, ids, nxt, filled))
        got = converted(**step_inputs(name, ids, nxt, shared))
    assert rel_err(got.logits, want.logits) <= TOL
    assert got.past_key_values is shared  # the caller's cache object, filled in place like the original's
    assert_same_cache(shared, filled)


def test_a_lowered_model_decodes_like_the_original():
    """``mhc_rewrite.lower``: the decoding graphs run the fused Triton ops (here the CPU interpreter, tests/conftest.py)
    on one token at a time; prefill and decoding steps give the original's logits, generate its tokens."""
    model, converted, ids = build("llama")
    mhc_rewrite.lower(converted)
    torch.manual_seed(1)
    steps = [ids] + [torch.randint(3, VOCAB, (2, 1)) for _ in range(2)]
    want_cache = got_cache = None
    with torch.no_grad():
        for i, step in enumerate(steps):
            want = model(**step_inputs("llama", ids, step, want_cache))
            got = converted(**step_inputs("llama", ids, step, got_cache))
            want_cache, got_cache = want.past_key_values, got.past_key_values
            assert rel_err(got.logits, want.logits) <= TOL, f"step {i}"
    graph = region_state(converted).last
    assert any("fused" in str(node.target) for node in graph.graph.nodes)  # the decoding graph is the lowered one
    mask = torch.ones_like(ids)
    assert torch.equal(converted.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False),
                       model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False))


T5_TRAINS = pytest.mark.xfail(strict=True, reason=(
    "known defect, found 2026-12-07 and not fixed: a converted T5's train-mode graph fails at its first call "
    "(RuntimeError 'view size is not compatible with input tensor's size and stride'), on main before this test too"))


@pytest.mark.parametrize("name", [pytest.param(name, marks=T5_TRAINS) if name == "t5" else name for name in MODELS])
def test_a_trained_model_decodes_what_it_computes_without_the_cache(name):
    """Every model here trains: in train mode (keyword inputs, ``labels=``) the loss is the original's, backward
    reaches the mHC parameters and an SGD step (lr 0.1) moves them. Back in eval mode, the trained model's cached
    decoding step gives the logits it computes from the whole sequence without a cache."""
    model, converted, ids = build(name)
    model.train(), converted.train()
    inputs = {"input_ids": ids, "labels": ids}
    want, got = model(**inputs), converted(**inputs)
    assert abs(got.loss.item() - want.loss.item()) <= TOL * abs(want.loss.item())
    got.loss.backward()
    mhc = {key: p for key, p in converted.named_parameters() if ".mhc." in key}
    assert mhc and all(p.grad is not None for key, p in mhc.items() if "phi" in key)
    before = {key: p.detach().clone() for key, p in mhc.items()}
    torch.optim.SGD(converted.parameters(), lr=0.1).step()
    assert any(not torch.equal(p, before[key]) for key, p in mhc.items())
    converted.eval()
    nxt = torch.randint(3, VOCAB, (2, 1))
    with torch.no_grad():
        prefix = ids[:, :3] if name == "t5" else ids
        cache = converted(**step_inputs(name, ids, prefix, None)).past_key_values
        cached = converted(**step_inputs(name, ids, nxt, cache)).logits[:, -1]
        whole = torch.cat([prefix, nxt], dim=1)
        full = {"input_ids": ids, "decoder_input_ids": whole} if name == "t5" else {"input_ids": whole}
        uncached = converted(**full, use_cache=False).logits[:, -1]
    assert rel_err(cached, uncached) <= TOL


def test_static_cache_generate_gives_the_original_tokens():
    model, converted, ids = build("llama")
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, cache_implementation="static")
    want = model.generate(ids, **kwargs)
    got = converted.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert region_state(converted).traces <= 2  # the buffers' length is fixed: one prefill, one decoding graph
    traces = region_state(converted).traces
    assert torch.equal(converted.generate(ids, **kwargs), want)
    assert region_state(converted).traces == traces
