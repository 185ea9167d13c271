"""Loss masks (checked by decoding the trained tokens), prompts, preference pairs, collate."""
import pytest
import torch

from posttrain.data import (
    ChatRecord,
    DataError,
    Example,
    Message,
    PreferenceRecord,
    PromptCompletionRecord,
    RLRecord,
    build_tokenizer,
    collate,
    encode_preference,
    encode_prompt,
    encode_sft,
    encode_sft_dataset,
)

CORPUS = ["the cat sat on the mat; the dog sat on the log. 12+34=46"] * 40


@pytest.fixture(scope="module", params=["char", "bpe"])
def tok(request):
    if request.param == "char":
        return build_tokenizer("char")
    return build_tokenizer("bpe", corpus=CORPUS, vocab_size=320)


def trained_text(tok, ex):
    return tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if m])


def untrained_text(tok, ex):
    return tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if not m])


def test_prompt_completion_mask_is_completion_plus_end(tok):
    rec = PromptCompletionRecord("the cat sat=", " on the mat")
    ex = encode_sft(rec, tok, max_len=256)
    assert trained_text(tok, ex) == " on the mat<|end|>"
    assert untrained_text(tok, ex) == "<|bos|><|user|>the cat sat=<|end|><|assistant|>"
    assert tok.decode(ex.input_ids) == "<|bos|><|user|>the cat sat=<|end|><|assistant|> on the mat<|end|>"
    # the prompt part is token-for-token what generation starts from
    prompt = encode_prompt(rec, tok)
    assert ex.input_ids[: len(prompt)] == prompt and not any(ex.loss_mask[: len(prompt)])
    assert ex.input_ids[-1] == tok.eos_token_id and ex.loss_mask[-1] == 1
    assert not ex.truncated


def test_chat_mask_only_on_assistant_turns(tok):
    rec = ChatRecord((
        Message("system", "sys"), Message("user", "u1"), Message("assistant", "a one"),
        Message("user", "u2"), Message("assistant", "a two"),
    ))
    ex = encode_sft(rec, tok, max_len=256)
    assert trained_text(tok, ex) == "a one<|end|>a two<|end|>"
    assert untrained_text(tok, ex) == "<|bos|><|system|>sys<|end|><|user|>u1<|end|><|assistant|><|user|>u2<|end|><|assistant|>"
    # two separate runs of ones
    runs = sum(1 for a, b in zip([0] + ex.loss_mask, ex.loss_mask) if b and not a)
    assert runs == 2


def test_foreign_chatml_template_is_masked_correctly():
    tok = build_tokenizer("char")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ex = encode_sft(PromptCompletionRecord("hi", "hello"), tok, max_len=256)
    assert trained_text(tok, ex) == "hello<|im_end|>\n"


def test_non_prefix_consistent_template_is_rejected():
    tok = build_tokenizer("char")
    tok.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(DataError, match="not prefix-consistent at message 1"):
        encode_sft(PromptCompletionRecord("q", "a"), tok, max_len=64)


def test_truncation_keeps_prompt_and_cuts_completion():
    tok = build_tokenizer("char")
    rec = PromptCompletionRecord("123+456=", "579579579")
    full = encode_sft(rec, tok, max_len=1000)
    ex = encode_sft(rec, tok, max_len=len(full) - 4)
    assert ex.truncated and len(ex) == len(full) - 4
    assert ex.input_ids == full.input_ids[: len(ex)]
    assert trained_text(tok, ex) == "579579"  # the closing <|end|> and 3 digits are cut


def test_encode_sft_dataset_counts_policy():
    tok = build_tokenizer("char")
    recs = [
        PromptCompletionRecord("1+1=", "2"),  # fits
        PromptCompletionRecord("1+1=", "2" * 10),  # completion truncated, still trained
        PromptCompletionRecord("1" * 40 + "=", "2"),  # prompt alone exceeds max_len
    ]
    max_len = len(encode_sft(recs[0], tok, max_len=100)) + 3
    kept, stats = encode_sft_dataset(recs, tok, max_len=max_len)
    assert (stats.n_in, stats.n_kept, stats.n_truncated, stats.n_dropped) == (3, 2, 1, 1)
    assert all(ex.n_trained > 0 and len(ex) <= max_len for ex in kept)
    kept, stats = encode_sft_dataset(recs, tok, max_len=max_len, overflow="drop")
    assert (stats.n_kept, stats.n_truncated, stats.n_dropped) == (1, 0, 2)


def test_encode_prompt_variants(tok):
    expected = tok.encode("<|bos|><|user|>2+2=<|end|><|assistant|>", add_special_tokens=False)
    assert encode_prompt("2+2=", tok) == expected
    assert encode_prompt(RLRecord("2+2=", "4"), tok) == expected
    assert encode_prompt(PromptCompletionRecord("2+2=", "4"), tok) == expected
    assert encode_prompt([{"role": "user", "content": "2+2="}], tok) == expected
    chat = ChatRecord((Message("user", "2+2="), Message("assistant", "4")))
    assert encode_prompt(chat, tok) == expected


def test_encode_preference_strings_and_message_lists(tok):
    chosen, rejected = encode_preference(PreferenceRecord("2+2=", "4", "5"), tok, 64)
    assert trained_text(tok, chosen) == "4<|end|>" and trained_text(tok, rejected) == "5<|end|>"
    prompt = encode_prompt("2+2=", tok)
    assert chosen.input_ids[: len(prompt)] == rejected.input_ids[: len(prompt)] == prompt

    # A multi-turn prompt with an assistant turn: only the response is trained.
    rec = PreferenceRecord(
        (Message("user", "hi"), Message("assistant", "hello"), Message("user", "2+2=")),
        (Message("assistant", "4"),),
        (Message("assistant", "22"),),
    )
    chosen, rejected = encode_preference(rec, tok, max_len=64)
    assert trained_text(tok, chosen) == "4<|end|>" and trained_text(tok, rejected) == "22<|end|>"
    assert "hello" in untrained_text(tok, chosen)


def test_collate_shifts_targets_and_pads_right():
    a = Example([5, 6, 7, 8], [0, 0, 1, 1])
    b = Example([9, 10], [0, 1])
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch.targets.tolist() == [[-100, 7, 8, -100], [10, -100, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert batch.input_ids.dtype == batch.targets.dtype == batch.position_ids.dtype == torch.long
    assert batch.n_targets == 3


def test_collate_matches_reference_shift_on_real_examples():
    tok = build_tokenizer("char")
    exs = [encode_sft(PromptCompletionRecord(f"{i}+{i * 7}=", str(i * 8)), tok, max_len=64) for i in range(1, 40, 3)]
    batch = collate(exs, tok.pad_token_id)
    B, T = batch.input_ids.shape
    for bi, ex in enumerate(exs):
        for t in range(T):
            nxt = t + 1
            want = ex.input_ids[nxt] if nxt < len(ex) and ex.loss_mask[nxt] else -100
            assert batch.targets[bi, t].item() == want
    # the trained targets decode to the completions + end, row by row
    for bi, ex in enumerate(exs):
        row = batch.targets[bi]
        assert tok.decode(row[row != -100].tolist()) == trained_text(tok, ex)
    assert batch.n_targets == sum(ex.n_trained for ex in exs)
