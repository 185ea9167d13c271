"""Toy policies and tasks that build in seconds on a CPU: the char tokenizer, our tiny MiniMax
hybrid, a tiny standard Hugging Face transformer, a verifiable toy task and toy preference pairs.

Model weights come from ``seed`` alone (the caller's torch RNG is left untouched), so two
calls with the same seed give the same policy.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while toy policies run (the models are too small to gain from
    more, and test machines are shared); the previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def char_tokenizer() -> Any:
    """The demo's character tokenizer (fixed alphabet, special tokens, chat template; no files)."""
    from posttrain.data import build_tokenizer

    return build_tokenizer("char")


def toy_hybrid(seed: int = 0, tokenizer: Any = None) -> nn.Module:
    """Our tiny MiniMax hybrid (preset ``tiny-hybrid``: 7 lightning + 1 softmax layer, 4 experts
    top-2, ~3M parameters) sized to the char tokenizer, in train mode. The native engine
    samples from it."""
    from posttrain.data import token_ids
    from posttrain.models import ModelConfig, build_model

    tok = tokenizer if tokenizer is not None else char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(ModelConfig(preset="tiny-hybrid"), **token_ids(tok)).train()


def toy_transformer(seed: int = 0, tokenizer: Any = None) -> nn.Module:
    """A tiny standard Hugging Face causal LM (Qwen2 architecture: 2 layers, hidden 128, head_dim
    64) sized to the char tokenizer, in train mode: a loss that runs on it runs on any HF model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from posttrain.data import token_ids

    tok = tokenizer if tokenizer is not None else char_tokenizer()
    ids = token_ids(tok)
    config = Qwen2Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=512, tie_word_embeddings=False,
        **ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config).train()


@dataclass(frozen=True)
class ToyTask:
    """A verifiable task: prompt texts (rendered with the chat template) and a reward on the
    decoded completion. ``max_new_tokens`` bounds the completions."""

    name: str
    prompts: tuple[str, ...]
    reward: Callable[[str], float]
    max_new_tokens: int = 3

    def encode(self, tokenizer: Any) -> list[list[int]]:
        from posttrain.data import encode_prompt

        return [encode_prompt(p, tokenizer) for p in self.prompts]

    def negated(self) -> "ToyTask":
        """The same task with reward ``-r``: optimising it must lower ``r``."""
        reward = self.reward
        return ToyTask(f"-({self.name})", self.prompts, lambda text: -reward(text), self.max_new_tokens)


_SUMS = ((1, 2), (13, 4), (7, 70), (25, 31), (9, 9), (40, 2), (3, 58), (66, 6))


def starts_with_digit(text: str) -> float:
    return float(text[:1].isdigit())


def starts_with_non_digit(text: str) -> float:
    return 1.0 - starts_with_digit(text)


def digit_task() -> ToyTask:
    """Prompts ``"a+b="``; reward 1 when the completion starts with a digit. A fresh toy policy
    does so ~10% of the time; a working policy-gradient loss raises that within ~10 steps."""
    return ToyTask("starts with a digit", tuple(f"{a}+{b}=" for a, b in _SUMS), starts_with_digit)


def non_digit_task() -> ToyTask:
    """The inverse of :func:`digit_task`: reward 1 when the completion does not start with a digit."""
    return ToyTask("starts with a non-digit", tuple(f"{a}+{b}=" for a, b in _SUMS), starts_with_non_digit)


def preference_pairs() -> list[tuple[str, str, str]]:
    """Fixed toy (prompt, chosen, rejected) triples: the right sum against a wrong one."""
    return [(f"{a}+{b}=", str(a + b), str(a + b + 1 + i % 3)) for i, (a, b) in enumerate(_SUMS)]


def response_ids(text: str, tokenizer: Any) -> list[int]:
    """Token ids of a response as the policy would emit it: the text, then end-of-sequence."""
    return list(tokenizer.encode(text, add_special_tokens=False)) + [tokenizer.eos_token_id]


def sequence_rows(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_id: int):
    """Right-padded rows of prompt + response ids: ``(input_ids [N, T], targets [N, T],
    attention_mask [N, T])`` with targets shifted (position t scores token t + 1) and
    IGNORE_INDEX off the response, as the stages collate them."""
    from posttrain.data.collate import IGNORE_INDEX

    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r))
        attention[i, : len(p) + len(r)] = 1
        targets[i, len(p) - 1 : len(p) - 1 + len(r)] = torch.tensor(list(r))
    return input_ids, targets, attention


def policy_logprobs(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                    attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprobs [N, T], aux)``: log pi(target) per position (fp32, 0 where targets is
    IGNORE_INDEX) and the router load-balancing loss (0 for dense models), through the learner's
    own forward and chunked LM head; works for the hybrid and for HF models."""
    from posttrain.models import forward_hidden, token_logprobs

    positions = torch.arange(input_ids.shape[1]).unsqueeze(0).expand_as(input_ids)
    hidden, aux = forward_hidden(model, input_ids, position_ids=positions, attention_mask=attention_mask)
    return token_logprobs(model, hidden, targets), aux
