"""Building, saving and loading the tokenizers used by tiny from-scratch models.

Two kinds, both saved in Hugging Face format (`tokenizer.json` + `tokenizer_config.json`,
loadable by `transformers.AutoTokenizer.from_pretrained(dir)` with no custom code):

- "char": one token per printable ASCII character (`string.printable`: letters, digits,
  punctuation, space, \\t \\n \\r \\x0b \\x0c), 100 tokens, plus the special tokens below.
  Any other character encodes to `<|unk|>`, so decode(encode(text)) == text holds exactly
  for printable-ASCII text (all synthetic tasks), not for arbitrary Unicode.
- "bpe": a byte-level BPE trained on a given corpus. Digits are split individually before
  BPE sees them, so every digit is one token and no merge ever contains a digit. Byte-level
  means any UTF-8 text round-trips.

Special tokens (ids 0..6 in this order, same for both kinds):

    <|pad|>        padding (pad_token)
    <|bos|>        start of a rendered conversation (bos_token)
    <|end|>        closes every chat turn; it is the eos_token, so generation stops at the end
                   of the assistant turn, and SFT trains the model to emit it
    <|user|> <|assistant|> <|system|>   role markers opening a turn
    <|unk|>        unknown character (char kind only ever emits it)

Chat template (jinja, stored inside tokenizer_config.json):

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>
    add_generation_prompt=True appends "<|assistant|>".

No separators or newlines are added, which keeps arithmetic examples ~16-24 tokens, and the
template is prefix-consistent: rendering messages[:i] with a generation prompt is a string
prefix of rendering messages[:i+1] when message i is the assistant's. The SFT loss mask
(posttrain.data.tokenize) relies on that property.
"""
from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
USER, ASSISTANT, SYSTEM, UNK = "<|user|>", "<|assistant|>", "<|system|>", "<|unk|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, END, USER, ASSISTANT, SYSTEM, UNK)

# Role markers are spelled "<|" + role + "|>", so the template needs no role lookup table.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

KINDS = ("char", "bpe")


@dataclass(frozen=True)
class TokenizerConfig:
    """The run's tokenizer (the recipe's `tokenizer:`), built or copied once into the run dir."""

    kind: Literal["char", "path"] = "char"  # char: one token per printable character (digits single tokens)
    path: Optional[str] = None  # kind path: a saved Hugging Face tokenizer directory

    def __post_init__(self) -> None:
        if self.kind != "path":
            if self.path is not None:
                raise ValueError(f"path: only with kind: path (kind is {self.kind!r}), got {self.path!r}")
            return
        try:
            if not self.path or not Path(self.path).is_dir():
                raise ValueError(f"path: directory not found: {self.path}")
            if not any((Path(self.path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
                raise ValueError(f"path: {self.path} has no tokenizer.json or tokenizer_config.json "
                                 "(not a saved Hugging Face tokenizer)")
        except OSError as e:  # a name too long for the file system, ...
            raise ValueError(f"path: {e.strerror}: {self.path}") from None


def token_ids(tokenizer: Any) -> dict[str, Any]:
    """What a fresh model needs from the tokenizer: vocabulary size and special ids (the keyword
    arguments of posttrain.models.build_model)."""
    return {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def build_tokenizer(
    kind: str = "char",
    *,
    corpus: Iterable[str] | None = None,
    vocab_size: int | None = None,
) -> PreTrainedTokenizerFast:
    """Build a tokenizer of `kind` ("char" or "bpe"); see the module docstring.

    "bpe" needs `corpus` (an iterable of training texts); `vocab_size` defaults to 512 and
    counts special tokens and the 256-byte alphabet. "char" takes neither argument.
    """
    if kind == "char":
        if corpus is not None or vocab_size is not None:
            raise ValueError("build_tokenizer('char') has a fixed vocabulary: pass no corpus/vocab_size")
        return _wrap(_char_backend())
    if kind == "bpe":
        if corpus is None:
            raise ValueError("build_tokenizer('bpe') needs a corpus (an iterable of strings)")
        return _wrap(_bpe_backend(corpus, vocab_size or 512))
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")


def _char_backend() -> Tokenizer:
    # A BPE model with no merges is exactly a character lookup; an empty pre-tokenizer keeps
    # spaces and newlines as ordinary characters, and Fuse() joins tokens with no separator.
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(set(string.printable)):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return backend


def _bpe_backend(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"bpe vocab_size must be >= {min_size} (specials + 256 bytes), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    # Digits are isolated first so arithmetic answers are always one token per digit.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    return backend


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> Path:
    """Save in Hugging Face format, atomically (temp dir, then rename), template in the config.

    An existing `out_dir` is replaced. Returns the directory.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # save_jinja_files=False keeps the chat template inside tokenizer_config.json, which
        # older transformers versions also read.
        tokenizer.save_pretrained(str(tmp), save_jinja_files=False)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory from local disk only (never the hub).

    Raises FileNotFoundError naming the path when it is not a directory.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {p}")
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tok.chat_template is None:
        raise ValueError(f"tokenizer at {p} has no chat template (needed to render prompts)")
    return tok
