"""DPO pairs: best-vs-worst selection, generation from the policy (token ids kept exactly),
files round-tripping through posttrain.data, malformed rows named by file and row, and the
dpo stage's recipe keys and their errors."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from posttrain.config import ConfigError, DPOStageConfig, ModelConfig, PairsConfig, load_recipe
from posttrain.data import DataError, encode_preference, load_records, write_task
from posttrain.models import build_model
from posttrain.rollout import RewardConfig, SamplingConfig
from posttrain.data import token_ids
from posttrain.stages.dpo import split_off
from posttrain.checkpoint import write_jsonl_atomic
from posttrain.stages.dpo_pairs import build_pair_rows, encode_pairs, generate_pair_rows, select_pair

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task("arithmetic", tmp_path_factory.mktemp("task"), n_train=50, n_eval=10, n_prompts=12,
                      max_digits=2, seed=0)


def test_select_pair_best_vs_worst_and_ties():
    assert select_pair([0.0, 1.0, 0.5, 1.0, 0.0]) == (1, 0)  # first of the tied best / worst
    assert select_pair([0.2, -1.0, 3.0]) == (2, 1)
    assert select_pair([1.0, 1.0, 1.0]) is None


def test_pair_rows_drop_equal_groups_and_keep_sampled_ids():
    class Rec:
        def __init__(self, p, a):
            self.prompt, self.answer, self.meta = p, a, {}

    recs = [Rec("1+1=", "2"), Rec("2+2=", "4")]
    comps = [[5, 6], [7], [8, 9, 1], [3]]
    rows = build_pair_rows(recs, [[1, 2], [1, 3]], comps, ["a", "b", "c", "d"], [0.0, 1.0, 1.0, 1.0], n=2)
    assert len(rows) == 1  # the second prompt's samples tie
    r = rows[0]
    assert (r["chosen_ids"], r["rejected_ids"], r["prompt_ids"]) == ([7], [5, 6], [1, 2])
    assert (r["chosen"], r["rejected"], r["chosen_reward"], r["rejected_reward"]) == ("b", "a", 1.0, 0.0)
    rows = build_pair_rows(recs[:1], [[1, 2]], [[5], [7]], ["", " "], [0.0, 1.0], n=2)
    assert (rows[0]["chosen"], rows[0]["rejected"]) == ("' '", "''")  # blank samples still make valid rows
    rows = build_pair_rows(recs[:1], [[1, 2]], [[5, 0], [7], [8]], ["x", "y", "z"], [9.0, 1.0, 0.0], n=3,
                           exclude_ids=[0])
    assert (rows[0]["chosen_ids"], rows[0]["rejected_ids"]) == ([7], [8])  # the sample with a pad id is out


class InProcessLearners:
    """LearnerGroup's call_rank0 on an in-process model (no Ray)."""

    world_size = 1

    def __init__(self, model):
        self.model = model

    def call_rank0(self, fn, *args):
        return fn(self.model, *args)


def test_generated_pairs_are_token_exact_and_reload_as_preference_data(tok, task, tmp_path):
    torch.manual_seed(0)
    learners = InProcessLearners(build_model(ModelConfig(preset="tiny-hybrid"), **token_ids(tok)))
    records = load_records(task["prompts"], "rl").records
    # A random model never answers right, so score by length: samples differ, pairs form.
    import sys
    import types

    mod = types.ModuleType("tests_reward")
    mod.by_length = lambda text, ref, **meta: float(len(text))
    sys.modules["tests_reward"] = mod
    try:
        cfg = PairsConfig(source="policy", sampling=SamplingConfig(n=4, max_new_tokens=6),
                          reward=RewardConfig(fn="tests_reward:by_length"))
        rows, stats = generate_pair_rows(learners, tok, records, cfg, seed=3)
        again, _ = generate_pair_rows(learners, tok, records, cfg, seed=3)
    finally:
        del sys.modules["tests_reward"]
    assert rows == again  # seeded sampling: a regenerated dataset would be identical
    assert stats["prompts"] == 12 and stats["pairs"] == len(rows) == 12 - stats["dropped_equal"]
    assert len(rows) >= 6
    for r in rows:
        assert r["chosen_reward"] > r["rejected_reward"]
        shown = tok.decode(r["chosen_ids"], skip_special_tokens=False)
        assert r["chosen"] == (shown if shown.strip() else repr(shown))
        assert len(r["chosen_ids"]) <= 6 and r["prompt_ids"] == tok.encode(
            tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                    add_generation_prompt=True), add_special_tokens=False)
    path = tmp_path / "pairs.jsonl"
    write_jsonl_atomic(path, rows)
    pairs = encode_pairs(load_records(path, "preference").records, tok, 64, path)
    for r, p in zip(rows, pairs):  # trained ids are the sampled ids, never re-tokenised text
        assert p.chosen.input_ids == r["prompt_ids"] + r["chosen_ids"]
        assert p.rejected.input_ids == r["prompt_ids"] + r["rejected_ids"]
        assert p.chosen.loss_mask == [0] * len(r["prompt_ids"]) + [1] * len(r["chosen_ids"])


def test_text_pairs_use_the_chat_template_and_truncate(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "1+2=", "chosen": "3", "rejected": "4"},
            {"prompt": [{"role": "user", "content": "9+9="}], "chosen": [{"role": "assistant", "content": "18"}],
             "rejected": "81"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_records(path, "preference").records
    pairs = encode_pairs(recs, tok, 64, path)
    assert [(p.chosen, p.rejected) for p in pairs] == [encode_preference(r, tok, 64) for r in recs]
    prompt_len = pairs[0].chosen.loss_mask.index(1)
    assert encode_pairs(recs, tok, prompt_len, path) == []  # nothing trainable left: dropped


def test_malformed_rows_name_file_and_row(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: key \"rejected\" missing"):
        load_records(path, "preference")
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "prompt_ids": [1],
                                  "chosen_ids": [2, "x"], "rejected_ids": [3]}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl pair 2: 'chosen_ids' must be a list"):
        encode_pairs(load_records(path, "preference").records, tok, 64, path)


def test_split_off_keeps_a_training_pair():
    assert split_off(list(range(10)), 0.25) == (list(range(7)), [7, 8, 9])
    assert split_off([1], 0.5) == ([1], [])
    assert split_off([1, 2], 0.0) == ([1, 2], [])


RECIPE = """
name: t
model: {{preset: tiny-hybrid}}
stages:
  - name: dpo
    kind: dpo
    steps: 5
    data: {data}
    {extra}
"""


def recipe(tmp_path, data: str, extra: str = "") -> str:
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(RECIPE.format(data=data, extra=extra)))
    return str(p)


def test_recipe_keys_parse(tmp_path):
    cfg = load_recipe(recipe(tmp_path, "{task: arithmetic, format: rl}",
                             "pairs: {source: policy, sampling: {n: 4}, reward: {fn: exact_match}}\n"
                             "    loss: {kind: robust, beta: 0.2, label_smoothing: 0.1, rpo_alpha: 1.0}"))
    st = cfg.stages[0]
    assert isinstance(st, DPOStageConfig)
    assert (st.pairs.sampling.n, st.loss.kind, st.loss.label_smoothing) == (4, "robust", 0.1)


@pytest.mark.parametrize("data,extra,error", [
    ("{task: arithmetic}", "pairs: {source: policy}", r"stages\[0\]\.data\.format: must be 'rl'"),
    ("{task: arithmetic, format: preference}", "", r"stages\[0\]\.data\.train: pairs\.source=file needs"),
    ("{task: arithmetic, format: rl}", "pairs: {source: policy, sampling: {n: 1}}", r"pairs\.sampling\.n: must be >= 2"),
    ("{task: arithmetic, format: rl}", "pairs: {source: policy, reward: {fn: nope}}", r"pairs\.reward\.fn: unknown reward"),
    ("{task: arithmetic, format: rl}", "pairs: {source: policy}\n    loss: {kind: hinge, label_smoothing: 0.1}",
     r"loss\.label_smoothing: unknown key"),
    ("{task: arithmetic, format: rl}", "pairs: {source: policy}\n    loss: {kind: sigmoid, beta: 0}", r"loss\.beta: must be a finite number > 0"),
    ("{task: arithmetic, format: rl}", "pairs: {source: policy}\n    loss: {beta: 0.1}", r"loss\.kind: required value missing"),
    ("{task: arithmetic, format: rl}", "pairs: {source: policy, eval_fraction: 1.0}", r"pairs\.eval_fraction"),
    ("{task: arithmetic, format: rl}", "pairs: {source: policy}\n    task_eval: /no/such.jsonl", r"task_eval: file not found"),
    ("{task: arithmetic, format: rl}", "pairs: {source: web}", r"stages\[0\]\.pairs\.source"),
])
def test_recipe_errors_name_the_key(tmp_path, data, extra, error):
    with pytest.raises(ConfigError, match=error):
        load_recipe(recipe(tmp_path, data, extra))
