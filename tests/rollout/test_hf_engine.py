"""The hf engine on a standard transformers model (Qwen2): one left-padded generate call for
prompts of mixed lengths, exact log-probs all the same, and sampling over the whole vocabulary
when the request sets no top-k (transformers would otherwise apply its default top_k=50)."""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.types import SamplingParams


def qwen2(vocab: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mixed_lengths_one_padded_call_exact_logprobs(prompts, recompute_logprobs, temperature, monkeypatch):
    model = qwen2(64)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked distributions: greedy has no near-ties
    engine = HFEngine(model)
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["input_ids"].shape) or generate(**kw))
    params = SamplingParams(n=3, temperature=temperature, max_new_tokens=10, seed=0)
    completions = engine.generate(prompts, params)
    assert calls == [(len(prompts) * 3, max(map(len, prompts)))]  # every row in one call
    for c in completions:
        ref = recompute_logprobs(model, prompts[c.prompt_index], c.token_ids, temperature)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0), (c, ref)
    if temperature == 0.0:  # padding changes nothing: each prompt alone gives the same tokens
        for p, prompt in enumerate(prompts):
            (alone,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=10))
            assert all(c.token_ids == alone.token_ids for c in completions if c.prompt_index == p)


def test_no_top_k_samples_the_whole_vocabulary():
    """A near-uniform model over 128 tokens: with top_k 0 (off) about 60% of first tokens rank
    below the 50 most likely; transformers' default top_k=50 would allow none."""
    model = qwen2(128)
    prompt = [1, 5, 9, 13]
    engine = HFEngine(model)
    completions = engine.generate([prompt], SamplingParams(n=64, temperature=1.0, max_new_tokens=1, seed=0))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    rank = {t: r for r, t in enumerate(logits.argsort(descending=True).tolist())}
    beyond = sum(rank[c.token_ids[0]] >= 50 for c in completions)
    assert beyond >= 16, beyond


# ---------------------------------------------------------------- static cache, compiled decode
# On CUDA the engine decodes through transformers' StaticCache and a compiled step (cuda_graphs);
# here the same code path runs on the CPU with the cache alone, and compiled in inductor's
# default mode (no CUDA graphs), against the dynamic-cache engine as the reference.
from posttrain.rollout.hf_engine import MIN_STATIC_CACHE_LEN, static_cache_len  # noqa: E402


def test_static_cache_length_is_bucketed_or_the_configured_max_len():
    assert static_cache_len(12, 128) == MIN_STATIC_CACHE_LEN == 256  # vs_trl's qwen2 RL shape
    assert static_cache_len(100, 128) == 256 and static_cache_len(129, 128) == 512
    assert static_cache_len(4000, 4) == 4096 and static_cache_len(4093, 4) == 8192
    assert static_cache_len(12, 128, fixed=300) == 300
    assert static_cache_len(12, 128, fixed=100) == 256  # max_len too short for this call: its bucket


def static_engine(model, compiled: bool = False, **kw) -> HFEngine:
    """An hf engine forced onto the static-cache path on the CPU (on CUDA cuda_graphs does it),
    compiled by inductor's default mode when `compiled` (reduce-overhead needs CUDA)."""
    from transformers.generation.configuration_utils import CompileConfig

    engine = HFEngine(model, **kw)
    engine.static_decode = True
    engine.compile_config = None
    if compiled:
        engine.compile_config = CompileConfig(mode="default", dynamic=False)
        engine.compile_config._compile_all_devices = True  # transformers compiles on CUDA only otherwise
    return engine


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_cache_decodes_what_the_dynamic_cache_does_and_is_reused(prompts, recompute_logprobs, temperature):
    model = qwen2(64)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    params = SamplingParams(n=3, temperature=temperature, max_new_tokens=10, seed=0)
    engine = static_engine(model)
    reference = HFEngine(model).generate(prompts, params)
    first = engine.generate(prompts, params)
    assert [c.token_ids for c in first] == [c.token_ids for c in reference]
    for c in first:
        ref = recompute_logprobs(model, prompts[c.prompt_index], c.token_ids, temperature)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0), (c, ref)
    assert engine.decode_shapes == {(len(prompts) * 3, 256)}
    (cache,) = engine._caches.values()
    keys = cache.layers[0].keys
    # shorter prompts, the same bucket and rows: the same cache tensors, emptied first (a stale
    # key would change these tokens: the reference engine starts from nothing)
    shorter = [p[: max(1, len(p) - 2)] for p in prompts]
    again = engine.generate(shorter, params)
    assert [c.token_ids for c in again] == [c.token_ids for c in HFEngine(model).generate(shorter, params)]
    (same,) = engine._caches.values()
    assert same is cache and same.layers[0].keys.data_ptr() == keys.data_ptr()


def test_the_last_two_static_caches_are_kept(prompts):
    """One cache per (rows, length), the least recently used dropped beyond MAX_CACHES (2): a
    training shape and an eval shape stay, memory stays bounded."""
    from posttrain.rollout.hf_engine import MAX_CACHES

    engine = static_engine(qwen2(64))
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=4)
    for rows in (prompts[:1], prompts[:2], prompts[:3], prompts[:2]):
        engine.generate(rows, params)
    assert MAX_CACHES == 2 and list(engine._caches) == [(3, 256), (2, 256)]


def test_compiled_static_decode_one_graph_for_many_prompt_widths_and_new_weights(prompts):
    """Inductor-compiled decode step (what cuda_graphs replays on CUDA): one graph for calls
    of different prompt widths in one bucket, the same tokens and log-probs as eager decoding,
    and weights loaded in place after compiling are the ones it decodes with."""
    import torch._dynamo

    model = qwen2(64)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    engine = static_engine(model, compiled=True)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3)
    for batch in (prompts, [p[:2] for p in prompts], [p + p for p in prompts]):
        got, want = engine.generate(batch, params), HFEngine(model).generate(batch, params)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        for a, b in zip(got, want):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert len(engine.decode_shapes) == 1
    torch.manual_seed(1)
    new = {name: torch.randn_like(t) * 0.5 for name, t in model.named_parameters() if name.endswith("q_proj.weight")}
    engine.load_weights(new.items())  # the RL weight sync: in place
    got, want = engine.generate(prompts, params), HFEngine(model).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_a_failed_compile_falls_back_to_eager_from_the_same_rng_state(prompts, monkeypatch):
    """cuda_graphs null: a failure of the compiled path warns, that call is redone eagerly from
    the RNG state it started with (the samples equal a never-compiled engine's), and later calls
    stay eager. cuda_graphs true: the failure is raised."""
    model = qwen2(64)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=5)
    want = HFEngine(model).generate(prompts, params)

    def broken(self, input_ids, mask, config, length):
        torch.rand(7)  # draws from the RNG before failing, as a compiled prefill would
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(HFEngine, "_generate_static", broken)
    engine = static_engine(model, cuda_graphs=None)
    with pytest.warns(RuntimeWarning, match="decoding eagerly from now on"):
        got = engine.generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert engine.static_decode is False
    assert [c.token_ids for c in engine.generate(prompts, params)] == [c.token_ids for c in want]
    with pytest.raises(RuntimeError, match="inductor failed"):
        static_engine(model, cuda_graphs=True).generate(prompts, params)


def test_cuda_graphs_applies_on_cuda_only_and_off_stays_off():
    model = qwen2(64)
    assert HFEngine(model, cuda_graphs=None).static_decode is False  # a CPU model: eager
    assert HFEngine(model, cuda_graphs=True).static_decode is False
    if torch.cuda.is_available():
        cuda = qwen2(64).cuda()
        assert HFEngine(cuda, cuda_graphs=None).static_decode is True
        assert HFEngine(cuda, cuda_graphs=False).static_decode is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_decode_equals_eager_and_follows_weight_updates(prompts):
    """On CUDA: the reduce-overhead (CUDA-graph) decode step gives eager's greedy tokens and
    log-probs (fp32), through a weight update loaded in place between calls."""
    model = qwen2(64).cuda()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    engine = HFEngine(model, cuda_graphs=True)
    assert engine.static_decode
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=12)
    for round_ in range(2):
        for batch in (prompts, [p[:2] for p in prompts]):
            got, want = engine.generate(batch, params), HFEngine(model).generate(batch, params)
            assert [c.token_ids for c in got] == [c.token_ids for c in want], round_
            for a, b in zip(got, want):
                assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3, rtol=0)
        torch.manual_seed(round_)
        engine.load_weights([(name, torch.randn_like(t) * 0.5) for name, t in model.named_parameters()
                             if name.endswith("q_proj.weight")])
    assert len(engine.decode_shapes) == 1
