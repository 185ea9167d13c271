"""Records -> token ids with a loss mask, through the tokenizer's chat template.

Every record is turned into a conversation (a list of messages) and rendered with
`tokenizer.apply_chat_template`. A prompt_completion record is one user message (the prompt)
followed by one assistant message (the completion).

Loss mask: 1 on the tokens of the trained assistant turns, i.e. the text the template adds
between "messages[:i] + generation prompt" and "messages[:i+1]" for each trained assistant
message i. With the toolkit's template that is the content plus the closing `<|end|>` (the
eos token), so the model learns to stop. Role markers and prompts get 0.

Tokenization is segment-wise: the rendered text is cut at those boundaries and each piece is
encoded separately (add_special_tokens=False; the template writes bos itself). The prompt
part is therefore token-for-token what `encode_prompt` gives at generation time, so SFT
trains on exactly the ids the model will see after the prompt when it generates (a BPE merge
can never straddle the prompt/completion boundary).

Truncation policy (`encode_sft`, `encode_preference`): sequences longer than `max_len` are cut
from the right, which keeps the prompt and truncates the completion (a truncated completion
loses its closing `<|end|>`); `Example.truncated` records it. When the prompt alone fills
`max_len` no trained token survives; `encode_sft_dataset` drops such examples (or, with
overflow="drop", every truncated one) and counts them in `EncodeStats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence, Union

from posttrain.data.formats import (
    ChatRecord,
    DataError,
    Message,
    Messages,
    PreferenceRecord,
    PromptCompletionRecord,
    RLRecord,
)


@dataclass(frozen=True)
class Example:
    """One tokenized sequence. loss_mask[t] = 1 when token t is a training target."""

    input_ids: list[int]  # [T]
    loss_mask: list[int]  # [T], 0/1
    truncated: bool = False

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and loss_mask ({len(self.loss_mask)}) differ in length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(self.loss_mask)


@dataclass(frozen=True)
class EncodeStats:
    n_in: int
    n_kept: int
    n_truncated: int  # kept, but cut to max_len
    n_dropped: int  # removed: nothing left to train on, or overflow="drop"


PromptLike = Union[str, Messages, Sequence[dict], PromptCompletionRecord, RLRecord, PreferenceRecord, ChatRecord]


def _as_messages(x: Union[str, Sequence[Any]], default_role: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": default_role, "content": x}]
    return [{"role": m.role, "content": m.content} if isinstance(m, Message) else dict(m) for m in x]


def _render(tokenizer, messages: list[dict], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def _encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _prefix_error(tokenizer, i: int) -> DataError:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return DataError(
        f"chat template of {name} is not prefix-consistent at message {i}: rendering the earlier "
        "messages with a generation prompt is not a prefix of the full rendering, so the "
        "assistant tokens cannot be located"
    )


def encode_conversation(messages: list[dict], tokenizer, *, max_len: int, train_from: int = 0) -> Example:
    """Tokenize a conversation, training on assistant messages with index >= train_from.

    Returns an Example of at most `max_len` tokens (right-truncated, see module docstring).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    full = _render(tokenizer, messages, gen=False)
    # Character spans [start, end) of the trained assistant turns inside `full`.
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < train_from:
            continue
        start_text = _render(tokenizer, messages[:i], gen=True)
        end_text = _render(tokenizer, messages[: i + 1], gen=False)
        if not (end_text.startswith(start_text) and full.startswith(end_text)):
            raise _prefix_error(tokenizer, i)
        spans.append((len(start_text), len(end_text)))
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for start, end in spans:
        prompt_ids = _encode_text(tokenizer, full[pos:start])
        turn_ids = _encode_text(tokenizer, full[start:end])
        ids += prompt_ids + turn_ids
        mask += [0] * len(prompt_ids) + [1] * len(turn_ids)
        pos = end
    tail = _encode_text(tokenizer, full[pos:])
    ids += tail
    mask += [0] * len(tail)
    if len(ids) > max_len:
        return Example(ids[:max_len], mask[:max_len], truncated=True)
    return Example(ids, mask)


def _sft_messages(record) -> list[dict]:
    if isinstance(record, PromptCompletionRecord):
        return [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.completion}]
    if isinstance(record, ChatRecord):
        return _as_messages(record.messages, "user")
    raise TypeError(f"encode_sft takes a PromptCompletionRecord or ChatRecord, got {type(record).__name__}")


def encode_sft(record: Union[PromptCompletionRecord, ChatRecord], tokenizer, *, max_len: int) -> Example:
    """Tokenize an SFT record; loss only on the completion / assistant turns (+ closing eos)."""
    return encode_conversation(_sft_messages(record), tokenizer, max_len=max_len)


def encode_sft_dataset(
    records: Iterable[Union[PromptCompletionRecord, ChatRecord]],
    tokenizer,
    *,
    max_len: int,
    overflow: Literal["truncate", "drop"] = "truncate",
) -> tuple[list[Example], EncodeStats]:
    """encode_sft over many records, applying and counting the truncation policy.

    overflow="truncate" keeps truncated examples that still have a trained token;
    overflow="drop" removes every example longer than max_len.
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f'overflow must be "truncate" or "drop", got {overflow!r}')
    kept: list[Example] = []
    n_in = n_trunc = 0
    for rec in records:
        n_in += 1
        ex = encode_sft(rec, tokenizer, max_len=max_len)
        if ex.truncated and (overflow == "drop" or ex.n_trained == 0):
            continue
        n_trunc += ex.truncated
        kept.append(ex)
    return kept, EncodeStats(n_in, len(kept), n_trunc, n_in - len(kept))


def prompt_messages(record_or_text: PromptLike) -> list[dict]:
    """The messages a generation prompt is made of (before the assistant's answer).

    A string is one user message; a message list is used as given; prompt_completion, rl and
    preference records use their prompt; a chat record uses the messages before its last
    assistant message.
    """
    x = record_or_text
    if isinstance(x, (PromptCompletionRecord, RLRecord, PreferenceRecord)):
        return _as_messages(x.prompt, "user")
    if isinstance(x, ChatRecord):
        last = max(i for i, m in enumerate(x.messages) if m.role == "assistant")
        return _as_messages(x.messages[:last], "user")
    if isinstance(x, (str, list, tuple)):
        return _as_messages(x, "user")
    raise TypeError(f"encode_prompt takes a string, a message list or a record, got {type(x).__name__}")


def encode_prompt(record_or_text: PromptLike, tokenizer) -> list[int]:
    """Token ids of the prompt rendered with the generation prompt (for RL rollouts, eval)."""
    return _encode_text(tokenizer, _render(tokenizer, prompt_messages(record_or_text), gen=True))


def encode_preference(record: PreferenceRecord, tokenizer, max_len: int) -> tuple[Example, Example]:
    """(chosen, rejected) Examples sharing the prompt; loss on the response turns only.

    A string response is one assistant message; a message-list response is appended to the
    prompt messages and only its assistant messages are trained (never prompt turns).
    """
    if not isinstance(record, PreferenceRecord):
        raise TypeError(f"encode_preference takes a PreferenceRecord, got {type(record).__name__}")
    prompt = _as_messages(record.prompt, "user")

    def side(response) -> Example:
        msgs = prompt + _as_messages(response, "assistant")
        return encode_conversation(msgs, tokenizer, max_len=max_len, train_from=len(prompt))

    return side(record.chosen), side(record.rejected)
