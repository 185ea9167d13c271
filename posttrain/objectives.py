"""Objectives: model + micro-batch -> (loss, metrics), built from posttrain.algorithms.

An objective is a module-level function (Ray ships it to the learner by reference). It
runs the model, gathers per-token log-probs and calls a pure loss. Metrics are returned
as contributions that *sum* to the step's value over micro-batches and ranks (each loss is
already divided by the global normaliser), so the learner only adds them up.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from posttrain.algorithms import cispo_loss, dpo_loss, grpo_loss, rollout_correction, sft_loss
from posttrain.data.collate import IGNORE_INDEX, Batch
from posttrain.models import forward_hidden, token_logprobs


def policy_logprobs(model: torch.nn.Module, batch: Batch, *, chunk_size: int = 1024,
                    with_entropy: bool = False):
    """Log-prob of each target token `[B, T]` (0 where targets == IGNORE_INDEX), router aux loss."""
    # The attention mask keeps right padding out of the router loss and out of attention:
    # without it, padded positions (no loss of their own) feed exploding gradients back
    # through the lightning layers' output norm.
    hidden, aux = forward_hidden(model, batch.input_ids, position_ids=batch.position_ids,
                                 cu_seqlens=batch.cu_seqlens, attention_mask=batch.attention_mask)
    out = token_logprobs(model, hidden, batch.targets, chunk_size=chunk_size, with_entropy=with_entropy)
    return out, aux


def sft_objective(model: torch.nn.Module, batch: Batch, *, num_tokens: int,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, Any]]:
    """Token-mean NLL over the optimizer step (normaliser `num_tokens`: all target tokens of
    the step, across micro-batches and ranks) plus the router load-balancing loss, weighted
    by this micro-batch's share of the step's tokens."""
    logp, aux = policy_logprobs(model, batch, chunk_size=chunk_size)
    mask = (batch.targets != IGNORE_INDEX).to(logp.dtype)  # [B, T]
    nll, _ = sft_loss(logp, mask, num_tokens=num_tokens)
    share = mask.sum() / num_tokens
    loss = nll + aux * share
    return loss, {"loss": nll.detach(), "aux_loss": (aux * share).detach(),
                  "tokens": mask.sum().detach()}


# ---------------------------------------------------------------------------- online RL
@dataclass
class RLBatch:
    """A micro-batch of sampled completions: one sequence (prompt ids + completion ids, exactly
    as the engine produced them) per row, right-padded. Flat tensor fields so the learner can
    move it to its device. Per-token fields are aligned with `targets` (position t scores token
    t + 1) and are 0 wherever targets == IGNORE_INDEX (prompt, padding, masked completions)."""

    input_ids: torch.Tensor  # [B, T] long
    targets: torch.Tensor  # [B, T] long, completion tokens only, IGNORE_INDEX elsewhere
    position_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    advantages: torch.Tensor  # [B] float32
    rollout_logprobs: torch.Tensor  # [B, T] float32, the engine's log-probs of the targets
    old_logprobs: Optional[torch.Tensor] = None  # [B, T] learner log-probs of the sampling policy
    ref_logprobs: Optional[torch.Tensor] = None  # [B, T] frozen reference policy (KL)

    @property
    def model_batch(self) -> Batch:
        return Batch(self.input_ids, self.targets, self.position_ids, self.attention_mask)

    @property
    def mask(self) -> torch.Tensor:  # [B, T] float32
        return (self.targets != IGNORE_INDEX).float()


def _tempered_logprobs(model: torch.nn.Module, batch: Batch, *, temperature: float, chunk_size: int,
                       with_entropy: bool):
    """log softmax(logits / T) of the targets `[B, T]` (the engine's log-prob convention,
    posttrain.rollout.types), optional entropy `[B, T]`, and the router aux loss.

    logits / T == head(hidden / T) because the LM head has no bias, so the chunked head of
    token_logprobs is reused unchanged."""
    hidden, aux = forward_hidden(model, batch.input_ids, position_ids=batch.position_ids,
                                 cu_seqlens=batch.cu_seqlens, attention_mask=batch.attention_mask)
    if temperature != 1.0:
        if model.get_output_embeddings().bias is not None:
            raise ValueError("sampling temperature != 1 needs an LM head without bias")
        hidden = hidden / temperature
    out = token_logprobs(model, hidden, batch.targets, chunk_size=chunk_size, with_entropy=with_entropy)
    return (*out, aux) if with_entropy else (out, None, aux)


@torch.no_grad()
def recompute_logprobs(model: torch.nn.Module, batches: list[Any], *, temperature: float = 1.0,
                       chunk_size: int = 1024) -> list[torch.Tensor]:
    """Per-target log-probs `[B, T]` (CPU, fp32) of each batch under `model`, no gradient.

    The learner's 'old' log-probs of the sampling policy (K > 1 updates per rollout batch,
    mismatch metrics, TIS/MIS) and a frozen reference's log-probs for KL. Accepts Batch or
    RLBatch. Runs in eval mode and restores the previous mode."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = []
        for b in batches:
            mb = b.model_batch if isinstance(b, RLBatch) else b
            mb = Batch(*(t.to(device) for t in (mb.input_ids, mb.targets, mb.position_ids, mb.attention_mask)))
            logp, _, _ = _tempered_logprobs(model, mb, temperature=temperature, chunk_size=chunk_size,
                                            with_entropy=False)
            out.append(logp.float().cpu())
        return out
    finally:
        model.train(was_training)


def _rl_inputs(model: torch.nn.Module, batch: RLBatch, *, temperature: float, chunk_size: int,
               correction: Optional[dict[str, Any]]):
    """Shared by the RL objectives: current log-probs, entropy, aux loss, mask, the sampling
    policy's log-probs (given, or the current ones detached when K == 1) and the TIS/MIS weight."""
    logp, entropy, aux = _tempered_logprobs(model, batch.model_batch, temperature=temperature,
                                            chunk_size=chunk_size, with_entropy=True)
    mask = batch.mask
    old = batch.old_logprobs if batch.old_logprobs is not None else logp.detach()
    is_weight, corr = None, {}
    if correction is not None:
        is_weight, corr = rollout_correction(old, batch.rollout_logprobs, mask, **correction)
    return logp, entropy, aux, mask, old, is_weight, corr


def _contributions(loss: torch.Tensor, metrics: dict[str, torch.Tensor], extra: dict[str, torch.Tensor],
                   entropy: torch.Tensor, aux: torch.Tensor, mask: torch.Tensor,
                   num_tokens: float) -> dict[str, Any]:
    """Turn a pure loss's micro-batch metrics into contributions that sum to the step's value:
    loss terms are already divided by the step's normaliser; token means are weighted by this
    micro-batch's share of the step's tokens. Max/min metrics cannot be summed and are dropped."""
    tokens = mask.sum()
    share = tokens / num_tokens
    out: dict[str, Any] = {"tokens": tokens.detach(), "aux_loss": (aux * share).detach(),
                           "entropy": ((entropy.detach() * mask).sum() / num_tokens)}
    for k, v in {**metrics, **extra}.items():
        if k in ("loss", "pg_loss"):
            out[k] = v.detach()
        elif k in ("tokens",) or k.endswith("_max") or k.endswith("_min"):
            continue
        else:
            out[k] = (v * share).detach()
    return out


def grpo_objective(model: torch.nn.Module, batch: RLBatch, *, num_tokens: float, num_sequences: float,
                   clip_low: float, clip_high: float, aggregation: str, kl_coef: float = 0.0,
                   kl_estimator: str = "k3", ratio_level: str = "token",
                   neg_adv_drop_ratio: Optional[float] = None, max_len: Optional[int] = None,
                   correction: Optional[dict[str, Any]] = None, temperature: float = 1.0,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, Any]]:
    """GRPO clipped surrogate (posttrain.algorithms.grpo_loss) on a sampled micro-batch.

    Normalisers are the optimizer step's global counts: `num_tokens` (token_mean) and
    `num_sequences` (seq_mean / fixed_len), across micro-batches and ranks. The router aux
    loss is weighted by this micro-batch's token share. `correction`: kwargs of
    algorithms.rollout_correction (TIS/MIS), or None."""
    logp, entropy, aux, mask, old, is_weight, corr = _rl_inputs(
        model, batch, temperature=temperature, chunk_size=chunk_size, correction=correction)
    loss, metrics = grpo_loss(
        logp, old, batch.advantages, mask, clip_low=clip_low, clip_high=clip_high, aggregation=aggregation,
        num_tokens=num_tokens, num_sequences=num_sequences, max_len=max_len, ref_logprobs=batch.ref_logprobs,
        kl_coef=kl_coef, kl_estimator=kl_estimator, ratio_level=ratio_level,
        neg_adv_drop_ratio=neg_adv_drop_ratio, is_weight=is_weight)
    share = mask.sum() / num_tokens
    return loss + aux * share, _contributions(loss, metrics, corr, entropy, aux, mask, num_tokens)


def cispo_objective(model: torch.nn.Module, batch: RLBatch, *, num_tokens: float, eps_high: float,
                    eps_low: Optional[float] = None, correction: Optional[dict[str, Any]] = None,
                    temperature: float = 1.0, chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, Any]]:
    """CISPO (MiniMax-M1; posttrain.algorithms.cispo_loss) on a sampled micro-batch: token mean
    over the optimizer step's global `num_tokens` (no KL, no sequence normaliser)."""
    logp, entropy, aux, mask, old, is_weight, corr = _rl_inputs(
        model, batch, temperature=temperature, chunk_size=chunk_size, correction=correction)
    loss, metrics = cispo_loss(logp, old, batch.advantages, mask, eps_high=eps_high, eps_low=eps_low,
                               num_tokens=num_tokens, is_weight=is_weight)
    share = mask.sum() / num_tokens
    return loss + aux * share, _contributions(loss, metrics, corr, entropy, aux, mask, num_tokens)


RL_OBJECTIVES = {"grpo": grpo_objective, "cispo": cispo_objective}


# ----------------------------------------------------------------------------------- DPO
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


def segment_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-document sums `[N]` of `values` `[T]` over the documents of cu_seqlens `[N + 1]`."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [N]
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths.to(values.device))
    return values.new_zeros(lengths.numel()).index_add(0, doc, values)


def sequence_logprobs(model: torch.nn.Module, batch: Batch, *, chunk_size: int = 1024):
    """Sequence log-prob = sum of the target tokens' log-probs, and the target counts: per row
    `[B]` of a padded batch, per document `[N]` of a packed row (cu_seqlens); the aux loss."""
    logp, aux = policy_logprobs(model, batch, chunk_size=chunk_size)  # [B, T], 0 off target
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


def _to_device(batch: Any, device: torch.device) -> Any:
    moved = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return dataclasses.replace(batch, **{k: v.to(device) for k, v in moved.items() if torch.is_tensor(v)})


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, batches: list[Union[Batch, AnyPreferenceBatch]], *,
                       chunk_size: int = 1024) -> list[float]:
    """Sequence log-probs of every sequence of `batches`, in order (run once, on the starting
    model): rows of a padded Batch, documents of a packed Batch, slots (chosen, then rejected)
    of a preference batch, padded or packed."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out: list[float] = []
        for b in batches:
            b = _to_device(b, device)
            if isinstance(b, Batch):
                seq = sequence_logprobs(model, b, chunk_size=chunk_size)[0]
            else:
                seq = preference_logprobs(model, b, chunk_size=chunk_size)[0]
            out += seq.double().cpu().tolist()
        return out
    finally:
        model.train(was_training)


def dpo_objective(model: torch.nn.Module, batch: AnyPreferenceBatch, *, num_pairs: int, beta: float,
                  loss_type: str = "sigmoid", label_smoothing: float = 0.0, rpo_alpha: float = 0.0,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, Any]]:
    """DPO-family loss (posttrain.algorithms.dpo_loss) on sequence log-probs summed over the
    response tokens, normalised by `num_pairs`: all pairs of the optimizer step across
    micro-batches and ranks. The router aux loss is weighted by this micro-batch's pair share.
    `batch`: right-padded (PreferenceBatch) or packed (PackedPreferenceBatch, long context);
    both give the same sequence log-probs.

    Metrics are contributions that sum to means over the step's pairs: dpo_loss's (rewards/*,
    logps/*, loss/*), `pref_accuracy` (implicit reward of chosen > rejected, ties within
    PREF_TIE_NATS count 1/2) and `logp_accuracy` (raw log-prob of chosen > rejected); `pairs`
    sums to the pair count.
    """
    seq, lengths, aux = preference_logprobs(model, batch, chunk_size=chunk_size)  # [2B]
    B = seq.shape[0] // 2
    ref = batch.ref_logps.to(seq.dtype)
    loss, m = dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=beta, loss_type=loss_type,
                       label_smoothing=label_smoothing, chosen_lengths=lengths[:B],
                       rejected_lengths=lengths[B:], rpo_alpha=rpo_alpha, num_pairs=num_pairs)
    share = B / num_pairs
    margin = ((seq[:B] - ref[:B]) - (seq[B:] - ref[B:])).detach()  # [B]
    tie = margin.abs() <= PREF_TIE_NATS
    metrics = {k: (v if k == "loss" else v * share) for k, v in m.items()}
    metrics.update({
        "pref_accuracy": ((margin > PREF_TIE_NATS).sum() + 0.5 * tie.sum()) / num_pairs,
        "logp_accuracy": (seq[:B] > seq[B:]).sum().detach() / num_pairs,
        "aux_loss": (aux * share).detach(),
        "pairs": float(B),
    })
    return loss + aux * share, metrics
