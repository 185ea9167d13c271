"""Offline preference objectives (dpo stages): the DPO-family losses, chosen by `loss.kind`.

The recipe's `loss:` is a tagged union, each kind with only its own knobs:

    sigmoid  DPO (Rafailov et al. 2023), optional label smoothing (cDPO)
    robust   robust DPO (Chowdhury et al. 2024), label smoothing = assumed label-flip rate
    ipo      IPO (Azar et al. 2023), length-normalised log-ratios
    hinge    SLiC hinge (Zhao et al. 2023)
    custom   a user's 'module:function' with the preference-loss signature of
             posttrain.algorithms.custom, resolved and signature-checked at load time

Every kind takes rpo_alpha (> 0 adds RPO's NLL of the chosen response). Sequence log-prob =
sum over the response tokens; the loss is normalised by the step's pair count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch

from posttrain.algorithms import dpo_loss
from posttrain.algorithms.custom import call_preference_loss, preference_loss_signature_error
from posttrain.data.collate import IGNORE_INDEX, Batch
from posttrain.objectives.common import Gathered, StepCounts, map_batches, segment_sums, target_logprobs
from posttrain.rollout import resolve_callable


def _beta_ok(beta: float) -> None:
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: must be a finite number > 0, got {beta}")


def _rpo_ok(rpo_alpha: float) -> None:
    if not (math.isfinite(rpo_alpha) and rpo_alpha >= 0):
        raise ValueError(f"rpo_alpha: must be a finite number >= 0, got {rpo_alpha}")


@dataclass(frozen=True)
class SigmoidDPOLoss:
    """DPO: -log sigmoid(beta * margin), with label smoothing eps in [0, 0.5] (conservative DPO)."""

    kind: Literal["sigmoid"] = "sigmoid"
    beta: float = 0.1  # strength of the implicit KL to the reference
    label_smoothing: float = 0.0  # probability that a pair's label is flipped
    rpo_alpha: float = 0.0  # weight of the chosen response's NLL (RPO); 0: off

    def __post_init__(self) -> None:
        _beta_ok(self.beta)
        _rpo_ok(self.rpo_alpha)
        if not 0 <= self.label_smoothing <= 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5], got {self.label_smoothing}")

    def compute(self, chosen, rejected, ref_chosen, ref_rejected, *, counts: StepCounts, chosen_lengths,
                rejected_lengths) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.kind,
                        label_smoothing=self.label_smoothing, chosen_lengths=chosen_lengths,
                        rejected_lengths=rejected_lengths, rpo_alpha=self.rpo_alpha, num_pairs=counts.sequences)


@dataclass(frozen=True)
class RobustDPOLoss(SigmoidDPOLoss):
    """Robust DPO: an unbiased loss under label noise at rate label_smoothing in [0, 0.5)."""

    kind: Literal["robust"] = "robust"  # type: ignore[assignment]

    def __post_init__(self) -> None:
        _beta_ok(self.beta)
        _rpo_ok(self.rpo_alpha)
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")


@dataclass(frozen=True)
class IPOLoss:
    """IPO: (margin / response length - 1 / (2 beta))^2 per pair."""

    kind: Literal["ipo"] = "ipo"
    beta: float = 0.1  # the regularisation target is 1 / (2 beta)
    rpo_alpha: float = 0.0  # weight of the chosen response's NLL (RPO); 0: off

    def __post_init__(self) -> None:
        _beta_ok(self.beta)
        _rpo_ok(self.rpo_alpha)

    def compute(self, chosen, rejected, ref_chosen, ref_rejected, *, counts: StepCounts, chosen_lengths,
                rejected_lengths) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.kind,
                        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                        rpo_alpha=self.rpo_alpha, num_pairs=counts.sequences)


@dataclass(frozen=True)
class HingeDPOLoss(IPOLoss):
    """SLiC hinge: max(0, 1 - beta * margin)."""

    kind: Literal["hinge"] = "hinge"  # type: ignore[assignment]


@dataclass(frozen=True)
class CustomPreferenceLoss:
    """A user's preference loss, 'module:function' with the signature documented in
    posttrain.algorithms.custom; `args` are passed as keyword arguments."""

    kind: Literal["custom"] = "custom"
    fn: str = ""  # 'package.module:function'
    args: dict[str, Any] = field(default_factory=dict)  # its own keyword arguments

    def __post_init__(self) -> None:
        try:
            problem = preference_loss_signature_error(resolve_callable(self.fn), self.args)
        except ValueError as e:
            problem = str(e)
        if problem:
            raise ValueError(f"fn: {problem}")

    def compute(self, chosen, rejected, ref_chosen, ref_rejected, *, counts: StepCounts, chosen_lengths,
                rejected_lengths) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return call_preference_loss(resolve_callable(self.fn), chosen, rejected, ref_chosen, ref_rejected,
                                    num_pairs=counts.sequences, chosen_lengths=chosen_lengths,
                                    rejected_lengths=rejected_lengths, args=self.args)


PreferenceLoss = Union[SigmoidDPOLoss, RobustDPOLoss, IPOLoss, HingeDPOLoss, CustomPreferenceLoss]


# Margins within this many nats count as ties in `pref_accuracy` (the starting model ranks
# every pair as a tie; float noise from different padding must not look like a preference).
PREF_TIE_NATS = 1e-4


@dataclass
class PreferenceBatch:
    """B preference pairs as 2B right-padded rows: rows [0, B) are the chosen responses,
    rows [B, 2B) the rejected ones (pair i = rows i and B + i). `input_ids`/`targets`/
    `position_ids`/`attention_mask` follow posttrain.data.Batch (targets shifted, -100 off the
    response); `ref_logps` are the reference model's sequence log-probs of the same rows."""

    input_ids: torch.Tensor  # [2B, T] long
    targets: torch.Tensor  # [2B, T] long
    position_ids: torch.Tensor  # [2B, T] long
    attention_mask: torch.Tensor  # [2B, T] long
    ref_logps: torch.Tensor  # [2B] float64

    @property
    def rows(self) -> Batch:
        return Batch(self.input_ids, self.targets, self.position_ids, self.attention_mask)


@dataclass
class PackedPreferenceBatch:
    """B preference pairs as 2B documents (prompt + one response each) packed into R rows of
    at most max_seq_len tokens (posttrain.stages.dpo_pairs.pack_pairs), the rows stored end
    to end in one stream. Each row is run through the model on its own (a [1, T_r] packed
    row with cu_seqlens: positions restart per document, no attention, recurrent state or
    target crosses a document boundary), so one forward never holds more than max_seq_len
    tokens. `slot_doc` maps the documents back to PreferenceBatch's order (slot k < B: chosen
    response of pair k, slot B + k: its rejected response); `ref_logps` is in slot order.
    Flat tensor fields, so the learner can move the batch to its device."""

    input_ids: torch.Tensor  # [1, T] long, T = sum of the 2B document lengths (no padding)
    targets: torch.Tensor  # [1, T] long, shifted per document, -100 off the responses
    position_ids: torch.Tensor  # [1, T] long, restarting at 0 per document
    cu_seqlens: torch.Tensor  # [2B + 1] int32, document boundaries in the stream
    row_bounds: torch.Tensor  # [R + 1] long, row boundaries in the stream (a subset of cu_seqlens)
    slot_doc: torch.Tensor  # [2B] long, stream index of the document in slot k
    ref_logps: torch.Tensor  # [2B] float64, slot order

    @property
    def num_rows(self) -> int:
        return self.row_bounds.numel() - 1

    def row(self, r: int) -> Batch:
        """Row r as a packed posttrain.data.Batch `[1, T_r]` with its own cu_seqlens."""
        lo, hi = int(self.row_bounds[r]), int(self.row_bounds[r + 1])
        cu = self.cu_seqlens.long()
        cu = cu[(cu >= lo) & (cu <= hi)] - lo  # [N_r + 1]
        return Batch(self.input_ids[:, lo:hi], self.targets[:, lo:hi], self.position_ids[:, lo:hi],
                     attention_mask=None, cu_seqlens=cu.to(torch.int32), max_seqlen=int((cu[1:] - cu[:-1]).max()))


AnyPreferenceBatch = Union[PreferenceBatch, PackedPreferenceBatch]


def sequence_logprobs(model: torch.nn.Module, batch: Batch, *, chunk_size: int = 1024):
    """Sequence log-prob = sum of the target tokens' log-probs, and the target counts: per row
    `[B]` of a padded batch, per document `[N]` of a packed row (cu_seqlens); the aux loss."""
    logp, _, aux = target_logprobs(model, batch, chunk_size=chunk_size)  # [B, T], 0 off target
    mask = (batch.targets != IGNORE_INDEX).to(logp.dtype)  # [B, T]
    if batch.cu_seqlens is None:
        return logp.sum(-1), mask.sum(-1), aux
    return segment_sums(logp[0], batch.cu_seqlens), segment_sums(mask[0], batch.cu_seqlens), aux


def preference_logprobs(model: torch.nn.Module, batch: AnyPreferenceBatch, *, chunk_size: int = 1024):
    """Sequence log-probs `[2B]` and target counts `[2B]` in slot order (chosen, then rejected)
    and the router aux loss, from a padded or a packed preference batch.

    Packed: one forward per row; the aux loss is the rows' token-weighted mean (the balancing
    loss is a product of batch means, so it depends on how tokens are grouped, as it does
    on the micro-batch split of padded batches)."""
    if isinstance(batch, PreferenceBatch):
        return sequence_logprobs(model, batch.rows, chunk_size=chunk_size)
    seqs, counts, aux = [], [], 0.0
    for r in range(batch.num_rows):
        row = batch.row(r)
        s, n, a = sequence_logprobs(model, row, chunk_size=chunk_size)  # [N_r] documents of row r
        seqs.append(s)
        counts.append(n)
        aux = aux + a * row.input_ids.shape[1]
    slot = batch.slot_doc
    return torch.cat(seqs)[slot], torch.cat(counts)[slot], aux / batch.input_ids.shape[1]


def reference_logprobs(model: torch.nn.Module, batches: list[Union[Batch, AnyPreferenceBatch]],
                       chunk_size: int = 1024) -> list[float]:
    """Sequence log-probs of every sequence of `batches`, in order (run once, on the starting
    model): rows of a padded Batch, documents of a packed Batch, slots (chosen, then rejected)
    of a preference batch, padded or packed."""

    def one(m: torch.nn.Module, b: Any) -> list[float]:
        if isinstance(b, Batch):
            seq = sequence_logprobs(m, b, chunk_size=chunk_size)[0]
        else:
            seq = preference_logprobs(m, b, chunk_size=chunk_size)[0]
        return seq.double().cpu().tolist()

    return [x for seqs in map_batches(model, batches, one) for x in seqs]


@dataclass(frozen=True)
class DPOObjective:
    """DPO-family loss on sequence log-probs summed over the response tokens, normalised by
    counts.sequences: all pairs of the optimizer step across micro-batches and ranks. The router
    aux loss is weighted by this micro-batch's pair share. `batch`: right-padded
    (PreferenceBatch) or packed (PackedPreferenceBatch, long context); both give the same
    sequence log-probs.

    Metrics are contributions that sum to means over the step's pairs: the loss's (rewards/*,
    logps/*, loss/*), `pref_accuracy` (implicit reward of chosen > rejected, ties within
    PREF_TIE_NATS count 1/2) and `logp_accuracy` (raw log-prob of chosen > rejected); `pairs`
    sums to the pair count. With `per_pair` (held-out evals) also `pair_scores`, Gathered: each
    pair's own pref_accuracy score (1, 0.5 or 0) `[B]`, in batch order, for a paired gain.
    """

    loss: PreferenceLoss
    chunk_size: int = 1024  # learner.loss_chunk_size
    per_pair: bool = False

    def __call__(self, model: torch.nn.Module, batch: AnyPreferenceBatch, counts: StepCounts
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
        seq, lengths, aux = preference_logprobs(model, batch, chunk_size=self.chunk_size)  # [2B]
        B = seq.shape[0] // 2
        num_pairs = counts.sequences
        ref = batch.ref_logps.to(seq.dtype)
        loss, m = self.loss.compute(seq[:B], seq[B:], ref[:B], ref[B:], counts=counts,
                                    chosen_lengths=lengths[:B], rejected_lengths=lengths[B:])
        share = B / num_pairs
        margin = ((seq[:B] - ref[:B]) - (seq[B:] - ref[B:])).detach()  # [B]
        tie = margin.abs() <= PREF_TIE_NATS
        scores = (margin > PREF_TIE_NATS).double() + 0.5 * tie.double()  # [B]: 1 right, 0.5 tie, 0 wrong
        metrics = {k: (v if k == "loss" else v * share) for k, v in m.items()}
        if self.per_pair:
            metrics["pair_scores"] = Gathered(scores.cpu())
        metrics.update({
            "pref_accuracy": scores.sum() / num_pairs,
            "logp_accuracy": (seq[:B] > seq[B:]).sum().detach() / num_pairs,
            "aux_loss": (aux * share).detach(),
            "pairs": float(B),
        })
        return loss + aux * share, metrics
