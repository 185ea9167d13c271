"""Tokenizer building: round trips, single-token digits, special tokens, chat template, HF I/O."""
import json
import random
import string

import pytest
from transformers import AutoTokenizer

from posttrain.data import SPECIAL_TOKENS, build_tokenizer, load_tokenizer, save_tokenizer

CORPUS = ["the cat sat on the mat and the dog sat on the log"] * 30 + ["12345+67890=80235 1111 2222 3333"] * 30


@pytest.fixture(scope="module")
def char_tok():
    return build_tokenizer("char")


@pytest.fixture(scope="module")
def bpe_tok():
    return build_tokenizer("bpe", corpus=CORPUS, vocab_size=300)


def _enc(tok, s):
    return tok.encode(s, add_special_tokens=False)


def test_char_vocab_layout(char_tok):
    assert len(char_tok) == len(SPECIAL_TOKENS) + len(set(string.printable))
    assert char_tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert (char_tok.pad_token, char_tok.bos_token, char_tok.eos_token) == ("<|pad|>", "<|bos|>", "<|end|>")


def test_char_round_trip_random_printable(char_tok):
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choices(string.printable, k=rng.randint(1, 60)))
        ids = _enc(char_tok, s)
        assert len(ids) == len(s)  # one token per character
        assert char_tok.decode(ids) == s


def test_char_special_tokens_are_single_ids(char_tok):
    ids = _enc(char_tok, "<|user|>hi<|end|>")
    assert ids == [3, char_tok.convert_tokens_to_ids("h"), char_tok.convert_tokens_to_ids("i"), 2]


def test_char_non_ascii_is_unk(char_tok):
    assert _enc(char_tok, "é") == [char_tok.unk_token_id]


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_digits_are_single_tokens(kind, char_tok, bpe_tok):
    tok = char_tok if kind == "char" else bpe_tok
    for d in string.digits:
        assert len(_enc(tok, d)) == 1
    # the corpus repeats "12345" and "1111" so an unconstrained BPE would merge them
    assert len(_enc(tok, "12345")) == 5
    assert len(_enc(tok, "1111+2222=3333")) == 14


def test_bpe_learns_merges_and_round_trips_unicode(bpe_tok):
    assert len(SPECIAL_TOKENS) + 256 < len(bpe_tok) <= 300  # merges learned, cap respected
    assert len(_enc(bpe_tok, "the cat sat on the mat")) < len("the cat sat on the mat")
    for s in ["the cat  sat\n\tok", "ünïcödé 日本語 🙂", " leading and trailing  ", "a<|end|>b"]:
        assert bpe_tok.decode(_enc(bpe_tok, s)) == s


def test_chat_template_rendering(char_tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "3"},
    ]
    text = char_tok.apply_chat_template(msgs, tokenize=False)
    assert text == "<|bos|><|system|>be brief<|end|><|user|>1+2=<|end|><|assistant|>3<|end|>"
    gen = char_tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert gen == "<|bos|><|system|>be brief<|end|><|user|>1+2=<|end|><|assistant|>"
    assert text.startswith(gen)  # prefix-consistency that the loss mask relies on


def test_chat_template_rejects_unknown_role(char_tok):
    with pytest.raises(Exception, match="unknown role"):
        char_tok.apply_chat_template([{"role": "bot", "content": "x"}], tokenize=False)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_and_load_with_plain_transformers(tmp_path, kind, char_tok, bpe_tok):
    tok = char_tok if kind == "char" else bpe_tok
    out = save_tokenizer(tok, tmp_path / "tok")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|assistant|>" in config["chat_template"]
    for loaded in (AutoTokenizer.from_pretrained(str(out)), load_tokenizer(out)):
        s = "the cat 123+45=168\n"
        assert _enc(loaded, s) == _enc(tok, s)
        assert loaded.decode(_enc(loaded, s)) == s
        assert loaded.eos_token == "<|end|>" and loaded.pad_token_id == 0
        msgs = [{"role": "user", "content": "hi"}]
        assert loaded.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            "<|bos|><|user|>hi<|end|><|assistant|>"
    save_tokenizer(tok, out)  # overwriting an existing directory works
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_build_and_load_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="needs a corpus"):
        build_tokenizer("bpe")
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer("bpe", corpus=CORPUS, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
