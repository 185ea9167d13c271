"""RL objectives and batch building without Ray: the objectives equal posttrain.algorithms'
losses on independently computed log-probs, their normalisation is global (1 micro-batch ==
several), and the learner trains on exactly the engine's tokens (aligned log-probs)."""
from __future__ import annotations

import pytest
import torch

from posttrain.algorithms import cispo_loss, grpo_loss
from posttrain.config import ModelConfig
from posttrain.models import build_model
from posttrain.objectives import CISPOLoss, GRPOLoss, PolicyObjective, RLBatch, StepCounts, target_logprobs
from posttrain.rollout import Completion, SamplingConfig, SamplingParams
from posttrain.stages.rl import Sample, to_rl_batch

PAD = 0


def objective(loss, temperature: float = 1.0) -> PolicyObjective:
    """The rl stage's objective for `loss`, scoring log-probs at the sampling temperature."""
    return PolicyObjective(loss, SamplingConfig(temperature=temperature, max_new_tokens=16))


def recompute_logprobs(model, batches, temperature: float = 1.0):
    return objective(GRPOLoss(), temperature).logprobs(model, batches)


def cispo_objective(model, b, *, num_tokens, **loss):
    return objective(CISPOLoss(**loss))(model, b, StepCounts(tokens=num_tokens))


def grpo_objective(model, b, *, num_tokens, num_sequences, **loss):
    return objective(GRPOLoss(**loss))(model, b, StepCounts(tokens=num_tokens, sequences=num_sequences))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**overrides):
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="tiny-hybrid", overrides={"num_hidden_layers": 2, **overrides}),
                    vocab_size=40, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    with torch.no_grad():  # peaked distributions: ratios and clipping are not all trivial
        m.lm_head.weight.mul_(4.0)
    return m.train()


@pytest.fixture(scope="module")
def model():
    return tiny()


@pytest.fixture(scope="module")
def model_no_aux():
    """The router load-balancing loss depends on the micro-batch's routing statistics (not a
    sum over tokens), so only the policy loss can be exactly invariant to the split."""
    return tiny(router_aux_loss_coef=0.0)


def make_samples(seed: int, n: int = 6) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(2, 6, (1,), generator=g))
        c = int(torch.randint(1, 7, (1,), generator=g))
        prompt = torch.randint(3, 40, (p,), generator=g).tolist()
        toks = torch.randint(3, 40, (c,), generator=g).tolist()
        lps = (-torch.rand(c, generator=g) * 3 - 0.5).tolist()
        reason = "length" if i % 3 == 0 else "stop"
        out.append(Sample(prompt, Completion(i, 0, toks, lps, reason), 0.0, 0.0,
                          advantage=float(torch.randn(1, generator=g))))
    return out


def reference_logprobs(model, samples: list[Sample], temperature: float = 1.0) -> list[torch.Tensor]:
    """Independent: one unpadded HF forward per sequence, log softmax(logits / T) at the
    completion tokens. Returns one [len(completion)] tensor per sample."""
    out = []
    for x in samples:
        ids = torch.tensor([x.prompt_ids + x.completion.token_ids])
        logits = model(ids).logits[0].float() / temperature
        lp = torch.log_softmax(logits[len(x.prompt_ids) - 1:-1], dim=-1)
        out.append(lp.gather(-1, torch.tensor(x.completion.token_ids)[:, None])[:, 0])
    return out


def padded(rows: list[torch.Tensor], batch: RLBatch, samples: list[Sample]) -> torch.Tensor:
    """Scatter per-sample completion vectors into the batch's [B, T] target positions."""
    out = torch.zeros(batch.targets.shape, dtype=rows[0].dtype)
    for b, (x, r) in enumerate(zip(samples, rows)):
        p = len(x.prompt_ids)
        out[b, p - 1:p - 1 + len(r)] = r
    return out


def test_batch_is_the_engine_tokens_with_completion_only_targets():
    samples = make_samples(0)
    b = to_rl_batch(samples, PAD, mask_truncated=False)
    for i, x in enumerate(samples):
        p, c = len(x.prompt_ids), x.completion.token_ids
        n = p + len(c)
        assert b.input_ids[i, :n].tolist() == x.prompt_ids + c
        assert b.attention_mask[i].tolist() == [1] * n + [0] * (b.input_ids.shape[1] - n)
        trained = [(t, int(v)) for t, v in enumerate(b.targets[i]) if v != -100]
        assert trained == [(p - 1 + j, tok) for j, tok in enumerate(c)]  # position t scores token t + 1
        assert torch.allclose(b.rollout_logprobs[i, p - 1:n - 1], torch.tensor(x.completion.logprobs))
        assert b.rollout_logprobs[i].abs().sum() == pytest.approx(sum(abs(v) for v in x.completion.logprobs), rel=1e-6)
    masked = to_rl_batch(samples, PAD, mask_truncated=True)
    for i, x in enumerate(samples):
        expect = 0 if x.completion.finish_reason == "length" else len(x.completion.token_ids)
        assert int(masked.mask[i].sum()) == expect


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recompute_logprobs_matches_unpadded_forward(model, temperature):
    samples = make_samples(1)
    b = to_rl_batch(samples, PAD, mask_truncated=False)
    [got] = recompute_logprobs(model, [b], temperature=temperature)
    with torch.no_grad():
        ref = padded(reference_logprobs(model.eval(), samples, temperature), b, samples)
    model.train()
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


@pytest.mark.parametrize("kind", ["grpo_token", "grpo_seq", "grpo_kl", "cispo"])
def test_objective_equals_algorithm_loss_on_same_logprobs(model, kind):
    samples = make_samples(2)
    b = to_rl_batch(samples, PAD, mask_truncated=False)
    # old log-probs away from the current ones so ratios leave the clip range
    b.old_logprobs = recompute_logprobs(model, [b])[0] + 0.3 * torch.randn(b.targets.shape) * b.mask
    n_tok, n_seq = float(b.mask.sum()) * 3, 18.0  # as if this were one of 3 micro-batches
    if kind == "cispo":
        loss, m = cispo_objective(model, b, num_tokens=n_tok, eps_high=0.2, eps_low=0.1)
    else:
        agg = "seq_mean" if kind == "grpo_seq" else "token_mean"
        kl = dict(kl_coef=0.05, kl_estimator="k3") if kind == "grpo_kl" else {}
        if kl:  # a frozen reference's log-probs, as the stage's reference policy provides them
            b.ref_logprobs = b.old_logprobs - 0.1 * b.mask
        loss, m = grpo_objective(model, b, num_tokens=n_tok, num_sequences=n_seq, clip_low=0.1,
                                 clip_high=0.2, aggregation=agg, **kl)
    with torch.no_grad():
        lp = padded(reference_logprobs(model, samples), b, samples)
        aux = m["aux_loss"]
    if kind == "cispo":
        ref_loss, ref_m = cispo_loss(lp, b.old_logprobs, b.advantages, b.mask, eps_high=0.2, eps_low=0.1,
                                     num_tokens=n_tok)
    else:
        ref_loss, ref_m = grpo_loss(lp, b.old_logprobs, b.advantages, b.mask, clip_low=0.1, clip_high=0.2,
                                    aggregation=agg, num_tokens=n_tok, num_sequences=n_seq,
                                    ref_logprobs=b.ref_logprobs, **kl)
        if kl:
            assert float(m["kl"]) == pytest.approx(float(ref_m["kl"]) * float(b.mask.sum()) / n_tok, abs=1e-6)
            assert float(ref_m["kl"]) > 0
    assert float(m["loss"]) == pytest.approx(float(ref_loss), abs=1e-5)
    assert float(loss.detach()) == pytest.approx(float(ref_loss) + float(aux), abs=1e-5)
    assert float(aux) > 0
    share = float(b.mask.sum()) / n_tok  # token-mean metrics come back as contributions
    assert float(m["clip_frac"]) == pytest.approx(float(ref_m["clip_frac"]) * share, abs=1e-6)
    assert 0 < float(ref_m["clip_frac"]) < 1  # the test exercises clipping


def grads(model, fn) -> torch.Tensor:
    model.zero_grad()
    fn().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("kind,agg", [("grpo", "token_mean"), ("grpo", "seq_mean"), ("cispo", None)])
def test_global_normalisation_one_micro_batch_equals_several(model_no_aux, kind, agg):
    model = model_no_aux
    samples = make_samples(3, n=6)
    whole = to_rl_batch(samples, PAD, mask_truncated=False)
    parts = [to_rl_batch(samples[i:i + 2], PAD, mask_truncated=False) for i in range(0, 6, 2)]
    n_tok, n_seq = float(whole.mask.sum()), 6.0
    old = {id(b): recompute_logprobs(model, [b])[0] - 0.2 * b.mask for b in (whole, *parts)}
    for b in (whole, *parts):
        b.old_logprobs = old[id(b)]

    def run(b):
        if kind == "cispo":
            return cispo_objective(model, b, num_tokens=n_tok, eps_high=0.1)
        return grpo_objective(model, b, num_tokens=n_tok, num_sequences=n_seq, clip_low=0.2, clip_high=0.1,
                              aggregation=agg)

    g_whole = grads(model, lambda: run(whole)[0])
    g_parts = grads(model, lambda: sum(run(b)[0] for b in parts))
    assert torch.allclose(g_whole, g_parts, atol=1e-6, rtol=1e-4), (g_whole - g_parts).abs().max()
    m_whole = run(whole)[1]
    m_parts = [run(b)[1] for b in parts]
    for k in ("loss", "clip_frac", "entropy", "tokens"):
        assert float(m_whole[k]) == pytest.approx(sum(float(m[k]) for m in m_parts), rel=1e-4, abs=1e-6)


def test_cispo_equals_reinforce_when_nothing_clipped(model):
    """CISPO with r == 1 everywhere (K == 1: old = current detached) is token-mean REINFORCE."""
    samples = make_samples(4)
    b = to_rl_batch(samples, PAD, mask_truncated=False)
    n_tok = float(b.mask.sum())
    g = grads(model, lambda: cispo_objective(model, b, num_tokens=n_tok, eps_high=0.2)[0])

    def reinforce():
        lp = padded(reference_logprobs(model, samples), b, samples)
        _, _, aux = target_logprobs(model, b.model_batch, chunk_size=1024)
        return -(b.advantages[:, None] * lp * b.mask).sum() / n_tok + aux

    g_ref = grads(model, reinforce)
    assert torch.allclose(g, g_ref, atol=1e-6, rtol=1e-4)


def test_sampling_seed_is_a_pure_function_of_step():
    from posttrain.stages.rl import sampling_seed

    assert sampling_seed(3, 10, 0) == sampling_seed(3, 10, 0)
    assert len({sampling_seed(3, s, r) for s in range(50) for r in range(3)}) == 150
    assert SamplingParams(seed=sampling_seed(3, 10, 0)).seed is not None
