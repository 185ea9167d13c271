"""Engine contract, checked for every engine against independent references:
log-probs == a full-forward recomputation, stop ids / finish reasons, seeded reproducibility,
prompt-major ordering, M1 early truncation."""
import math

import pytest
import torch

from posttrain.rollout.sampling import early_stop_length
from posttrain.rollout.types import SamplingParams

ENGINE_NAMES = ["hf", "native"]


@pytest.fixture(params=ENGINE_NAMES)
def engine_and_model(request, tiny_engines):
    return tiny_engines[request.param]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=2, temperature=0.0, max_new_tokens=12),
        SamplingParams(n=3, temperature=0.7, top_k=10, top_p=0.9, max_new_tokens=12, seed=1),
        SamplingParams(n=2, temperature=1.3, max_new_tokens=12, seed=2, stop_token_ids=(3, 4, 5, 6)),
    ],
    ids=["greedy", "topk-topp", "stop-ids"],
)
def test_logprobs_match_full_forward(engine_and_model, params, prompts, recompute_logprobs):
    engine, model = engine_and_model
    completions = engine.generate(prompts, params)
    assert [(c.prompt_index, c.sample_index) for c in completions] == [
        (p, s) for p in range(len(prompts)) for s in range(params.n)
    ]
    for c in completions:
        ref = recompute_logprobs(model, prompts[c.prompt_index], c.token_ids, params.temperature)
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0), (c, ref)
        stops = [i for i, t in enumerate(c.token_ids) if t in params.stop_token_ids]
        if c.finish_reason == "stop":
            assert stops == [len(c.token_ids) - 1]
        else:
            assert c.finish_reason == "length" and not stops and len(c.token_ids) == params.max_new_tokens


def test_greedy_is_argmax_of_reference(engine_and_model, prompts):
    engine, model = engine_and_model
    (c,) = engine.generate([prompts[0]], SamplingParams(temperature=0.0, max_new_tokens=8))
    ids = torch.tensor([prompts[0] + c.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompts[0]) - 1 : -1]
    assert c.token_ids == logits.argmax(-1).tolist()


def test_stop_ids_fire(engine_and_model, prompts):
    engine, _ = engine_and_model
    params = SamplingParams(n=4, temperature=1.5, max_new_tokens=40, seed=0, stop_token_ids=tuple(range(2, 12)))
    completions = engine.generate(prompts, params)
    assert sum(c.finish_reason == "stop" for c in completions) >= len(completions) // 2


def test_seeded_sampling_reproducible(engine_and_model, prompts):
    engine, _ = engine_and_model
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=123)
    a = engine.generate(prompts, params)
    b = engine.generate(prompts, params)
    other = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=124))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    assert [c.token_ids for c in a] != [c.token_ids for c in other]
    # samples within a group differ (each sample has its own randomness)
    assert len({tuple(c.token_ids) for c in a[:3]}) > 1


def test_early_truncation_fires(engine_and_model, prompts):
    engine, model = engine_and_model
    # At T = 0.01 the sampled (argmax) tokens have probability ~1 under the tempered policy,
    # so a run of 4 tokens above 0.99 appears within the first few tokens.
    params = SamplingParams(n=2, temperature=0.01, max_new_tokens=20, seed=0, early_stop_run=4, early_stop_prob=0.99)
    completions = engine.generate(prompts, params)
    full = engine.generate(prompts, SamplingParams(n=2, temperature=0.01, max_new_tokens=20, seed=0))
    assert any(c.finish_reason == "truncated" for c in completions)
    for c, f in zip(completions, full):
        keep = early_stop_length(f.logprobs, 4, 0.99)
        if c.finish_reason == "truncated":
            # stopped exactly where the untruncated sample first completed the run
            assert keep == len(c.token_ids) and c.token_ids == f.token_ids[:keep]
            assert all(lp > math.log(0.99) for lp in c.logprobs[-4:])
        else:
            assert keep is None and c.token_ids == f.token_ids


def test_early_stop_length_reference():
    lp = [math.log(p) for p in [0.995, 0.999, 0.5, 0.999, 0.991, 0.9999, 0.2]]
    assert early_stop_length(lp, 3, 0.99) == 6
    assert early_stop_length(lp, 4, 0.99) is None
    assert early_stop_length(lp, None, 0.99) is None


def test_load_weights_changes_outputs(engine_and_model, prompts, recompute_logprobs):
    engine, model = engine_and_model
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = engine.generate([prompts[0]], params)[0]
    original = model.lm_head.weight.detach().clone()
    try:
        engine.load_weights([("lm_head.weight", torch.flip(original, dims=[0]))])
        after = engine.generate([prompts[0]], params)[0]
        ref = recompute_logprobs(model, prompts[0], after.token_ids, 0.0)
        assert after.token_ids != before.token_ids
        assert torch.allclose(torch.tensor(after.logprobs), ref, atol=1e-5, rtol=0)
        with pytest.raises(KeyError, match="no_such"):
            engine.load_weights([("no_such.weight", original)])
    finally:
        engine.load_weights([("lm_head.weight", original)])


def test_hf_ignores_model_default_eos(tiny_engines, prompts):
    """Stop ids come only from SamplingParams: a model whose generation_config names an eos that
    greedy decoding emits mid-way must still generate max_new_tokens (not stop and pad)."""
    engine, model = tiny_engines["hf"]
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    (free,) = engine.generate([prompts[0]], params)
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = free.token_ids[3]
        (again,) = engine.generate([prompts[0]], params)
    finally:
        model.generation_config.eos_token_id = saved
    assert again.token_ids == free.token_ids and again.finish_reason == "length"
