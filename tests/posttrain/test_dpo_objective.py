"""DPOObjective against an independent per-sequence reference, its global-pair normaliser
(micro-batches add up to the full batch), and the starting point (policy == reference)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.config import ModelConfig
from posttrain.data import Example
from posttrain.models import build_model
from posttrain.objectives import DPOObjective, IPOLoss, SigmoidDPOLoss, StepCounts, reference_logprobs
from posttrain.data import token_ids
from posttrain.stages.dpo_pairs import Pair, collate_pairs, with_reference

torch.set_num_threads(1)
# The router loss is a product of batch means (not additive over micro-batches): off here.
MODEL = ModelConfig(preset="tiny-hybrid", overrides={"router_aux_loss_coef": 0.0})


@pytest.fixture()
def model(tok):
    torch.manual_seed(0)
    return build_model(MODEL, **token_ids(tok))


def make_pairs(tok, n: int, seed: int = 0) -> list[Pair]:
    """Pairs of different prompt and response lengths (so rows get different padding)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = [tok.bos_token_id] + torch.randint(10, 60, (3 + i % 4,), generator=g).tolist()
        sides = []
        for k in (2 + i % 3, 1 + (i * 2) % 5):
            resp = torch.randint(10, 60, (k,), generator=g).tolist() + [tok.eos_token_id]
            sides.append(Example(prompt + resp, [0] * len(prompt) + [1] * len(resp)))
        pairs.append(Pair(*sides, ref_chosen=-3.0 * (i + 1) / n, ref_rejected=-2.0 + 0.3 * i))
    return pairs


def seq_logp_alone(model, ex: Example) -> torch.Tensor:
    """Sum of response-token log-probs, one unpadded sequence through the plain HF forward."""
    ids = torch.tensor([ex.input_ids])
    logits = model(input_ids=ids).logits[0].float()  # [T, V]
    logp = F.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]  # predicts token t+1
    return (logp * torch.tensor(ex.loss_mask[1:], dtype=logp.dtype)).sum()


def reference_loss(model, pairs, beta, smoothing, rpo_alpha) -> torch.Tensor:
    total = 0.0
    for p in pairs:
        c, r = seq_logp_alone(model, p.chosen), seq_logp_alone(model, p.rejected)
        d = beta * ((c - p.ref_chosen) - (r - p.ref_rejected))
        pref = -(1 - smoothing) * F.logsigmoid(d) - smoothing * F.logsigmoid(-d)
        total = total + pref + rpo_alpha * (-c / sum(p.chosen.loss_mask))
    return total / len(pairs)


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_matches_per_sequence_reference_loss_and_gradient(tok, model):
    pairs = make_pairs(tok, 5)
    objective = DPOObjective(SigmoidDPOLoss(beta=0.5, label_smoothing=0.1, rpo_alpha=0.3))
    expected = reference_loss(model, pairs, 0.5, 0.1, 0.3)
    expected.backward()
    g_ref = grads(model)
    loss, metrics = objective(model, collate_pairs(pairs, tok.pad_token_id), StepCounts(sequences=5))
    loss.backward()
    g = grads(model)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["pairs"] == 5
    worst = max(((g[k] - g_ref[k]).abs().max() / g_ref[k].abs().max().clamp_min(1e-12)).item() for k in g_ref)
    assert worst < 1e-4, f"gradient differs by up to {worst:.2e} (relative)"


def test_micro_batches_sum_to_the_global_batch(tok, model):
    pairs = make_pairs(tok, 6, seed=1)
    objective = DPOObjective(IPOLoss(beta=0.2))
    full, m_full = objective(model, collate_pairs(pairs, tok.pad_token_id), StepCounts(sequences=6))
    full.backward()
    g_full = grads(model)
    total, sums = 0.0, {}
    for part in (pairs[:2], pairs[2:]):  # unequal micro-batches, normalised by the global count
        loss, m = objective(model, collate_pairs(part, tok.pad_token_id), StepCounts(sequences=6))
        loss.backward()
        total += loss.item()
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    g = grads(model)
    assert total == pytest.approx(full.item(), rel=1e-5)
    for k in ("loss", "rewards/margins", "rewards/accuracies", "pref_accuracy", "logp_accuracy", "pairs"):
        assert sums[k] == pytest.approx(float(m_full[k]), rel=1e-5, abs=1e-6), k
    assert max((g[k] - g_full[k]).abs().max().item() for k in g_full) < 1e-5


def test_at_the_reference_every_pair_is_a_tie(tok, model):
    pairs = make_pairs(tok, 6, seed=2)
    batches = [collate_pairs(pairs[i:i + 3], tok.pad_token_id).rows for i in (0, 3)]
    flat = reference_logprobs(model, batches)
    ref = [(flat[0], flat[3]), (flat[1], flat[4]), (flat[2], flat[5]), (flat[6], flat[9]), (flat[7], flat[10]),
           (flat[8], flat[11])]
    pairs = with_reference(pairs, ref)
    for p in pairs:  # independent check of the stored values
        assert p.ref_chosen == pytest.approx(seq_logp_alone(model, p.chosen).item(), abs=1e-4)
    # another batch layout than the one the reference was computed with: still ties
    loss, m = DPOObjective(SigmoidDPOLoss(beta=0.1))(model, collate_pairs(pairs[::-1], tok.pad_token_id),
                                                     StepCounts(sequences=6))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-4)  # -log sigmoid(0)
    assert float(m["pref_accuracy"]) == 0.5
    assert abs(float(m["rewards/margins"])) < 1e-5


def test_preference_accuracy_counts_implicit_reward_ranking(tok, model):
    pairs = make_pairs(tok, 4, seed=3)
    flat = reference_logprobs(model, [collate_pairs(pairs, tok.pad_token_id).rows])
    # shift the reference so that pairs 0 and 1 favour chosen and pairs 2 and 3 rejected
    ref = [(flat[i] + (-1.0 if i < 2 else 1.0), flat[4 + i]) for i in range(4)]
    _, m = DPOObjective(SigmoidDPOLoss(beta=0.1))(model, collate_pairs(with_reference(pairs, ref), tok.pad_token_id),
                                                  StepCounts(sequences=4))
    assert float(m["pref_accuracy"]) == 0.5 and float(m["rewards/accuracies"]) == 0.5
    ref = [(flat[i] - 1.0, flat[4 + i]) for i in range(3)] + [(flat[3], flat[7])]
    _, m = DPOObjective(SigmoidDPOLoss(beta=0.1))(model, collate_pairs(with_reference(pairs, ref), tok.pad_token_id),
                                                  StepCounts(sequences=4))
    assert float(m["pref_accuracy"]) == pytest.approx(3.5 / 4)  # three wins and one tie


def test_per_pair_scores_rank_each_pair_by_its_own_implicit_reward(tok, model):
    """per_pair hands back each pair's pref_accuracy score (1 / 0.5 / 0) in batch order, from the
    pair's margin computed alone (seq_logp_alone); the scores sum to pref_accuracy's count. Without
    per_pair (training) nothing per pair crosses back."""
    from posttrain.objectives.common import Gathered
    from posttrain.objectives.dpo import PREF_TIE_NATS

    pairs = make_pairs(tok, 5, seed=4)
    flat = reference_logprobs(model, [collate_pairs(pairs, tok.pad_token_id).rows])
    shifts = [-1.0, 1.0, 0.0, -2.0, 0.5]  # reference moved: chosen favoured, disfavoured, tie, ...
    pairs = with_reference(pairs, [(flat[i] + shifts[i], flat[5 + i]) for i in range(5)])
    batch = collate_pairs(pairs, tok.pad_token_id)
    _, m = DPOObjective(SigmoidDPOLoss(beta=0.1), per_pair=True)(model, batch, StepCounts(sequences=5))
    assert isinstance(m["pair_scores"], Gathered)
    expected = []
    for p in pairs:
        margin = (seq_logp_alone(model, p.chosen).item() - p.ref_chosen) - (seq_logp_alone(model, p.rejected).item()
                                                                           - p.ref_rejected)
        expected.append(0.5 if abs(margin) <= PREF_TIE_NATS else float(margin > 0))
    assert m["pair_scores"].value.tolist() == expected == [1.0, 0.0, 0.5, 1.0, 0.0]
    assert float(m["pref_accuracy"]) == pytest.approx(sum(expected) / 5)
    _, m = DPOObjective(SigmoidDPOLoss(beta=0.1))(model, batch, StepCounts(sequences=5))
    assert "pair_scores" not in m
