"""Preference pairs for the `dpo` stage: read from files or sampled from the policy, encoded
token-in/token-out, and their reference log-probs computed once.

Files in the stage dir (written atomically, reused on resume):

    pairs/train.jsonl, pairs/eval.jsonl   generated pairs (pairs.source=policy): preference
                                          rows (prompt/chosen/rejected texts) plus the exact
                                          token ids (prompt_ids, chosen_ids, rejected_ids)
                                          and both rewards
    pairs/info.json                       generation stats; written last = generation complete
    pairs/ref_logps.json                  reference sequence log-probs of every pair, with a
                                          fingerprint of the pairs' tokens and the model

A preference row carrying `prompt_ids`/`chosen_ids`/`rejected_ids` is trained on exactly those
ids (never re-tokenised text); any other row goes through the chat template
(posttrain.data.encode_preference).

Micro-batches: right-padded (collate_pairs), or, for long context (`data.pack`), the pairs'
documents packed into rows of data.max_seq_len tokens (pack_pairs). Packed pairs are never
truncated: a response whose document does not fit is an error naming the pair.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch

from posttrain.data import DataError, Example, PreferenceRecord, collate, encode_preference, encode_prompt
from posttrain.data.collate import shifted_targets
from posttrain.data.packing import best_fit_decreasing
from posttrain.learner import Learners
from posttrain.lora import AdapterDisabled
from posttrain.objectives import AnyPreferenceBatch, PackedPreferenceBatch, PreferenceBatch, reference_logprobs
from posttrain.rollout import (
    RewardConfig, RewardRunner, RolloutConfig, SamplingConfig, SamplingParams, generate_on_model,
)

ID_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
NO_LIMIT = 2**62  # encoding length when documents must not be cut (packed pairs)


@dataclass(frozen=True)
class PairsConfig:
    """Where a `dpo` stage's preference pairs come from (the recipe's `stages[i].pairs:`).

    `file`: data.train (and optionally data.eval) are preference datasets (prompt/chosen/
    rejected, strings or chat messages; data.format: preference).
    `policy`: data.train is a prompt file with answers (data.format: rl; default: the task's
    prompts.jsonl); the stage's starting model samples `sampling.n` completions per prompt,
    `reward` scores them, and the best vs the worst completion of each prompt becomes a pair
    (prompts whose samples all score the same are dropped). Generated pairs are saved in the
    stage dir and reused on resume. Held-out pairs: data.eval if given, else the last
    `eval_fraction` of the pairs.
    """

    source: Literal["file", "policy"] = "file"  # pairs read from files, or sampled from the policy and scored
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # policy: how candidates are sampled
    reward: RewardConfig = field(default_factory=RewardConfig)  # policy: how candidates are scored
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # policy: the engine on the learner's weights
    num_prompts: Optional[int] = None  # policy: use the first N prompts (default: all)
    eval_fraction: float = 0.1  # held-out share of the pairs when data.eval is not given

    def __post_init__(self) -> None:
        if self.source == "policy":
            if self.sampling.n < 2:
                raise ValueError(f"sampling.n: must be >= 2 (best vs worst), got {self.sampling.n}")
            if not self.sampling.temperature > 0:
                raise ValueError(f"sampling.temperature: must be > 0 (greedy samples are all equal), "
                                 f"got {self.sampling.temperature}")
        if self.num_prompts is not None and not self.num_prompts >= 1:
            raise ValueError(f"num_prompts: must be >= 1, got {self.num_prompts}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")


@dataclass(frozen=True)
class Pair:
    """One encoded preference pair and its reference sequence log-probs (nan until computed)."""

    chosen: Example
    rejected: Example
    ref_chosen: float = math.nan
    ref_rejected: float = math.nan


# ------------------------------------------------------------------------- encoding
def _token_example(prompt_ids: list[int], completion_ids: list[int], max_len: int) -> Example:
    ids = prompt_ids + completion_ids
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    if len(ids) > max_len:  # same policy as posttrain.data: keep the prompt, cut the response
        return Example(ids[:max_len], mask[:max_len], truncated=True)
    return Example(ids, mask)


def _ids(meta: dict[str, Any], key: str, where: str) -> list[int]:
    v = meta[key]
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise DataError(f"{where}: {key!r} must be a list of non-negative token ids")
    return v


def encode_pair(record: PreferenceRecord, tokenizer: Any, max_len: int, where: str, *,
                truncate: bool = True) -> Optional[Pair]:
    """A Pair, or None when either response has no trained token left after truncation.

    truncate=False (packed pairs): a prompt + response longer than max_len is a DataError
    naming `where`, never a cut response."""
    present = [k for k in ID_KEYS if k in record.meta]
    if present and len(present) < len(ID_KEYS):
        raise DataError(f"{where}: has {present} but not all of {list(ID_KEYS)}")
    limit = max_len if truncate else NO_LIMIT
    if present:
        prompt = _ids(record.meta, "prompt_ids", where)
        chosen = _token_example(prompt, _ids(record.meta, "chosen_ids", where), limit)
        rejected = _token_example(prompt, _ids(record.meta, "rejected_ids", where), limit)
    else:
        chosen, rejected = encode_preference(record, tokenizer, limit)
    for side, ex in (("chosen", chosen), ("rejected", rejected)):
        if len(ex) > max_len:
            raise DataError(f"{where}: prompt + {side} response is {len(ex)} tokens, longer than "
                            f"data.max_seq_len={max_len}; packed pairs are not truncated (raise "
                            f"data.max_seq_len or remove the pair)")
    if chosen.n_trained == 0 or rejected.n_trained == 0:
        return None
    return Pair(chosen, rejected)


def encode_pairs(records: Sequence[PreferenceRecord], tokenizer: Any, max_len: int, path: Path, *,
                 truncate: bool = True) -> list[Pair]:
    out = [encode_pair(r, tokenizer, max_len, f"{path} pair {i + 1}", truncate=truncate)
           for i, r in enumerate(records)]
    return [p for p in out if p is not None]


def collate_pairs(pairs: Sequence[Pair], pad_id: int) -> PreferenceBatch:
    """B pairs -> one PreferenceBatch of 2B rows (chosen first, then rejected)."""
    rows = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float64)
    return PreferenceBatch(rows.input_ids, rows.targets, rows.position_ids, rows.attention_mask, ref)


def pack_pairs(pairs: Sequence[Pair], max_seq_len: int) -> PackedPreferenceBatch:
    """B pairs -> their 2B documents (prompt + response) packed into rows of at most
    `max_seq_len` tokens by best-fit decreasing, rows stored end to end (see
    PackedPreferenceBatch). Per document, as posttrain.data.pack: targets shifted inside the
    document (its last position is never a target), positions restart at 0. Deterministic."""
    docs = [p.chosen for p in pairs] + [p.rejected for p in pairs]  # slot order
    B = len(pairs)
    for k, d in enumerate(docs):
        if not 1 <= len(d) <= max_seq_len:
            side = "chosen" if k < B else "rejected"
            raise ValueError(f"pair {k % B} of the micro-batch: its {side} document has {len(d)} tokens, "
                             f"outside [1, max_seq_len={max_seq_len}]; packed pairs are not truncated")
    bins = best_fit_decreasing([len(d) for d in docs], max_seq_len)
    order = [k for b in bins for k in b]  # stream position n holds the document of slot order[n]
    ids: list[int] = []
    targets: list[int] = []
    positions: list[int] = []
    cu = [0]
    for k in order:
        d = docs[k]
        ids += d.input_ids
        targets += shifted_targets(d.input_ids, d.loss_mask)
        positions += range(len(d))
        cu.append(cu[-1] + len(d))
    row_ends = torch.tensor([sum(len(docs[k]) for k in b) for b in bins]).cumsum(0)
    slot_doc = torch.empty(len(docs), dtype=torch.long)
    slot_doc[torch.tensor(order)] = torch.arange(len(docs))
    ref = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=torch.float64)
    return PackedPreferenceBatch(
        input_ids=torch.tensor([ids], dtype=torch.long), targets=torch.tensor([targets], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long), cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        row_bounds=torch.cat([torch.zeros(1, dtype=torch.long), row_ends]), slot_doc=slot_doc, ref_logps=ref)


def preference_batch(pairs: Sequence[Pair], pad_id: int, pack_len: Optional[int] = None) -> AnyPreferenceBatch:
    """One micro-batch: right-padded (pack_len None) or packed into rows of pack_len tokens."""
    return collate_pairs(pairs, pad_id) if pack_len is None else pack_pairs(pairs, pack_len)


# ----------------------------------------------------------------------- generation
def select_pair(rewards: Sequence[float]) -> Optional[tuple[int, int]]:
    """(best, worst) sample indices (first on ties), or None when all rewards are equal."""
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return None if rewards[best] == rewards[worst] else (best, worst)


def _plain_prompt(prompt: Any) -> Any:
    return prompt if isinstance(prompt, str) else [{"role": m.role, "content": m.content} for m in prompt]


def _shown(text: str) -> str:
    # The preference format rejects blank responses; an immediate <|end|> or a whitespace-only
    # sample is still a valid pair (its ids are what is trained), so show it quoted.
    return text if text.strip() else repr(text)


def build_pair_rows(records: Sequence[Any], prompt_ids: Sequence[list[int]], completions: Sequence[list[int]],
                    texts: Sequence[str], rewards: Sequence[float], n: int,
                    exclude_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Preference rows (best vs worst of each prompt's `n` samples; prompt-major inputs).
    `texts`: the completions as decoded for display (the ids are what is trained). Samples
    containing any of `exclude_ids` take no part (the pad token: its all-zero embedding gives
    NaN gradients once it sits inside a sequence, which an untrained policy does sample)."""
    rows = []
    banned = set(exclude_ids)
    for i, rec in enumerate(records):
        usable = [i * n + j for j in range(n) if not banned.intersection(completions[i * n + j])]
        picked = select_pair([rewards[k] for k in usable]) if usable else None
        if picked is None:
            continue
        b, w = (usable[j] for j in picked)
        rows.append({
            "prompt": _plain_prompt(rec.prompt), "chosen": _shown(texts[b]), "rejected": _shown(texts[w]),
            "answer": rec.answer, "prompt_index": i, "chosen_reward": rewards[b], "rejected_reward": rewards[w],
            "prompt_ids": list(prompt_ids[i]), "chosen_ids": list(completions[b]),
            "rejected_ids": list(completions[w]),
        })
    return rows


def generate_pair_rows(learners: Learners, tokenizer: Any, records: Sequence[Any], cfg: PairsConfig, seed: int
                       ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Sample cfg.sampling.n completions per rl record on learner rank 0, score them with
    cfg.reward (posttrain.rollout.rewards, as RL does) and keep best vs worst."""
    prompt_ids = [encode_prompt(r, tokenizer) for r in records]
    params = SamplingParams.of(cfg.sampling, stop_token_ids=(tokenizer.eos_token_id,), seed=seed)
    completions = learners.call_rank0(generate_on_model, prompt_ids, params, cfg.rollout)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]  # as rewards see them
    k = cfg.sampling.n
    refs = [r.answer for r in records for _ in range(k)]
    metas = [dict(r.meta) for r in records for _ in range(k)]
    rewards, reward_metrics = RewardRunner(cfg.reward).score(texts, refs, metas)
    shown = [tokenizer.decode(ids, skip_special_tokens=False) for ids in completions]
    rows = build_pair_rows(records, prompt_ids, completions, shown, rewards, k, exclude_ids=[tokenizer.pad_token_id])
    stats = {"prompts": float(len(records)), "pairs": float(len(rows)),
             "dropped_equal": float(len(records) - len(rows)), **reward_metrics}
    return rows, stats


# ------------------------------------------------------------------------ reference
def fingerprint(pairs: Sequence[Pair], model: Optional[str]) -> str:
    """Identifies the reference log-probs: the pairs' exact tokens and the starting model."""
    h = hashlib.sha1(str(model).encode())
    for p in pairs:
        for ex in (p.chosen, p.rejected):
            h.update(json.dumps([ex.input_ids, ex.loss_mask]).encode())
    return h.hexdigest()


def compute_reference(learners: Learners, pairs: Sequence[Pair], pad_id: int, micro_size: int,
                      chunk_size: int, pack_len: Optional[int] = None) -> list[tuple[float, float]]:
    """(chosen, rejected) sequence log-probs of every pair under the learner's current weights,
    through the same batches as training (padded, or packed into rows of pack_len tokens).

    Called before the stage's first update, when the learner IS the reference model, so the
    learner never holds a second model. With LoRA the adapters are disabled for it: the
    reference is the base weights the adapter trains on (for a fresh adapter, whose B is 0,
    the same values; with lora.continue_adapter, the base under the continued adapter)."""
    batches = [preference_batch(pairs[i:i + micro_size], pad_id, pack_len) for i in range(0, len(pairs), micro_size)]
    flat = learners.call_rank0(AdapterDisabled(reference_logprobs), batches, chunk_size)
    out: list[tuple[float, float]] = []
    pos = 0
    for i in range(0, len(pairs), micro_size):
        b = len(pairs[i:i + micro_size])
        out += list(zip(flat[pos:pos + b], flat[pos + b:pos + 2 * b]))
        pos += 2 * b
    return out


def with_reference(pairs: Sequence[Pair], ref: Sequence[tuple[float, float]]) -> list[Pair]:
    if len(ref) != len(pairs):
        raise ValueError(f"{len(ref)} reference log-prob pairs for {len(pairs)} pairs")
    return [dataclasses.replace(p, ref_chosen=c, ref_rejected=r) for p, (c, r) in zip(pairs, ref)]
