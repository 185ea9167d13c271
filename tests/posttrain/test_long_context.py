"""Long-context SFT: packing in the sft stage, per-stage model overrides, checkpointing switch,
the needle eval. Varlen attention itself is tested in tests/models/test_varlen.py.

Reference for packing: the same documents right-padded in one micro-batch (attention mask),
in fp32 — the SFT loss and every parameter gradient must agree.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from posttrain.config import (
    ConfigError, DataConfig, LearnerConfig, ModelConfig, OptimConfig, ScheduleConfig, load_recipe, recipe_path,
)
from posttrain.data import collate, collate_packed, load_records, pack, write_task
from posttrain.data.tasks.needle import cell_accuracy, has_cells, per_cell_limit, plot_cells
from posttrain.models import build_model, load_model
from posttrain.data import token_ids
from posttrain.objectives import SFTObjective, StepCounts
from posttrain.stages.common import micro_batches
from posttrain.stages.sft import collate_units, encode, n_targets, training_units

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def needle_records(tmp_path_factory):
    files = write_task("needle", tmp_path_factory.mktemp("needle"), n_train=12, n_eval_per_cell=2,
                       lengths=[40, 96, 160], depths=[0.0, 0.5, 1.0], seed=3)
    return (load_records(files["sft_train"], "prompt_completion").records,
            load_records(files["sft_eval"], "prompt_completion").records)


def loss_and_grads(model, batch, num_tokens):
    model.zero_grad()
    loss, metrics = SFTObjective(chunk_size=64)(model, batch, StepCounts(tokens=num_tokens))
    loss.backward()
    return float(metrics["loss"]), float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_row_gives_the_padded_sft_loss_and_gradient(tok, needle_records):
    data = DataConfig(max_seq_len=1024, pack=True)
    examples = encode(needle_records[0][:6], tok, data)
    assert len({len(ex) for ex in examples}) > 1
    rows = training_units(examples, data)
    assert len(rows) == 1 and len(rows[0].cu_seqlens) == len(examples) + 1  # one row, all documents
    num_tokens = n_targets(rows[0])
    assert num_tokens == sum(n_targets(ex) for ex in examples)

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-hybrid"), **token_ids(tok)).train()
    packed = micro_batches(rows, 1, 1, lambda mb: collate_units(mb, tok.pad_token_id))[0][0]
    padded = collate(examples, tok.pad_token_id)
    nll_p, loss_p, g_p = loss_and_grads(model, packed, num_tokens)
    nll_r, loss_r, g_r = loss_and_grads(model, padded, num_tokens)
    assert nll_p == pytest.approx(nll_r, rel=1e-5)
    assert loss_p == pytest.approx(loss_r, rel=1e-5)  # router aux loss over the same tokens
    assert g_p.keys() == g_r.keys()
    for name in g_r:
        scale = g_r[name].abs().max().clamp_min(1e-6)
        assert (g_p[name] - g_r[name]).abs().max() / scale < 1e-4, name

    # the same row without document boundaries (one long document) is a different loss:
    # the comparison above can fail
    leaky = dataclasses.replace(packed, cu_seqlens=None, max_seqlen=None,
                                position_ids=torch.arange(packed.input_ids.shape[1])[None])
    nll_leak, _, _ = loss_and_grads(model, leaky, num_tokens)
    assert abs(nll_leak - nll_r) > 1e-3


@pytest.mark.parametrize("mode", ["bfd", "split"])
def test_packing_keeps_every_target_once(tok, needle_records, mode):
    data = DataConfig(max_seq_len=128, pack=True, pack_mode=mode)
    examples = encode(needle_records[0], tok, data)
    rows = training_units(examples, data)
    assert all(len(r) <= 128 for r in rows)
    if mode == "split":  # long examples are kept whole, then cut with a one-token overlap
        assert max(len(ex) for ex in examples) > 128
        assert sum(n_targets(r) for r in rows) == sum(n_targets(ex) for ex in examples)
    for r in rows:  # no document's last position predicts the next document's first token
        assert bool((r.targets[r.cu_seqlens[1:].long() - 1] == -100).all())
        assert bool((r.position_ids[r.cu_seqlens[:-1].long()] == 0).all())


def test_micro_batches_shard_rows_over_ranks(tok, needle_records):
    data = DataConfig(max_seq_len=256, pack=True)
    rows = training_units(encode(needle_records[0], tok, data), data)[:4]
    per_rank = micro_batches(rows, 2, 1, lambda mb: collate_units(mb, tok.pad_token_id))
    assert [len(r) for r in per_rank] == [2, 2]
    b = per_rank[1][0]
    assert b.input_ids.shape == (1, len(rows[2])) and torch.equal(b.cu_seqlens, rows[2].cu_seqlens)


def _demo_with(*overrides: str):
    return load_recipe("demo", list(overrides))


def test_config_pack_needs_one_row_per_micro_batch():
    with pytest.raises(ConfigError, match=r"stages\[0\]\.batch\.micro_size: must be 1 with data\.pack"):
        _demo_with("stages.0.data.pack=true")
    cfg = _demo_with("stages.0.data.pack=true", "stages.0.batch.micro_size=1",
                     "stages.0.learner.gradient_checkpointing=true")
    assert cfg.stages[0].data.pack and cfg.stages[0].learner.gradient_checkpointing is True


def test_stage_model_overrides_set_the_rope_base_of_the_loaded_checkpoint(tok, tmp_path):
    base = ModelConfig(preset="tiny-hybrid", overrides={"router_aux_loss_coef": 0.0})
    torch.manual_seed(0)
    build_model(base, **token_ids(tok)).save_pretrained(tmp_path / "ckpt")
    cfg = _demo_with()
    long = dataclasses.replace(cfg.stages[0], model_overrides={"rope_parameters": {"rope_type": "default", "rope_theta": 1.0e7}})
    assert base.with_overrides(cfg.stages[0].model_overrides) is base  # no stage overrides: unchanged
    merged = base.with_overrides(long.model_overrides)
    assert merged.overrides == {"router_aux_loss_coef": 0.0, "rope_parameters": {"rope_type": "default", "rope_theta": 1.0e7}}
    old = load_model(tmp_path / "ckpt", base)
    new = load_model(tmp_path / "ckpt", merged)
    assert new.config.rope_parameters["rope_theta"] == 1.0e7 and old.config.rope_parameters["rope_theta"] == 10000.0
    ids = torch.randint(5, 40, (1, 48))
    with torch.no_grad():  # same weights, different RoPE in the softmax layer
        assert not torch.allclose(old(ids).logits, new(ids).logits, atol=1e-4)


def _checkpointed_layers(model):
    return [layer.gradient_checkpointing for layer in model.model.layers]


def test_learner_stage_switch_turns_checkpointing_on_and_off(tok, ray_local):
    from posttrain.cluster import ClusterConfig, LearnerGroup

    group = LearnerGroup(ClusterConfig(learners=1, cpus_per_learner=0.5), ModelConfig(preset="tiny-hybrid"), None,
                         token_ids=token_ids(tok), seed=0)
    try:
        optim, sched = OptimConfig(), ScheduleConfig()
        group.configure(optim, sched, LearnerConfig(), 1)
        assert group.call_rank0(_checkpointed_layers) == [False] * 8  # model default
        group.configure(optim, sched, LearnerConfig(gradient_checkpointing=True), 1)
        assert group.call_rank0(_checkpointed_layers) == [True] * 8
        group.configure(optim, sched, LearnerConfig(gradient_checkpointing=False), 1)
        assert group.call_rank0(_checkpointed_layers) == [False] * 8
    finally:
        group.shutdown()


# ------------------------------------------------------------------------- needle eval
def test_cell_accuracy_groups_by_length_and_depth():
    cells = cell_accuracy([512, 512, 512, 1024, 1024], [0.0, 0.0, 1.0, 0.0, 0.0], [True, False, True, False, False])
    assert cells == [
        {"length": 512, "depth": 0.0, "accuracy": 0.5, "n": 2},
        {"length": 512, "depth": 1.0, "accuracy": 1.0, "n": 1},
        {"length": 1024, "depth": 0.0, "accuracy": 0.0, "n": 2},
    ]
    with pytest.raises(ValueError, match="2 lengths, 1 depths"):
        cell_accuracy([1, 2], [0.0], [True, True])


def test_needle_rows_have_cells_and_limit_keeps_every_cell(needle_records, tmp_path):
    train, ev = needle_records
    assert has_cells(ev) and not has_cells([dataclasses.replace(ev[0], meta={})])
    limited = per_cell_limit(list(ev), 9)  # 9 cells x 2 rows -> 1 row per cell
    assert len(limited) == 9 and len({(r.meta["length"], r.meta["depth"]) for r in limited}) == 9
    cells = cell_accuracy([r.meta["length"] for r in ev], [r.meta["depth"] for r in ev], [i % 2 == 0 for i in range(len(ev))])
    png = plot_cells(cells, tmp_path / "plots" / "x.png", "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _stage_ctx(tok, tmp_path, recipe):
    from rich.console import Console

    from posttrain.stages.common import StageContext

    return StageContext(model=recipe.model, cluster=recipe.cluster, run_seed=recipe.seed, run_dir=tmp_path, stage_dir=tmp_path / "stage", tokenizer=tok,
                        tokenizer_dir=tmp_path / "tok", init_path=None, logger=None,
                        console=Console(quiet=True), seed=recipe.seed)


def test_data_mix_adds_short_task_examples_to_the_packed_long_stage(tok, tmp_path):
    from posttrain.stages.sft import mix_examples

    recipe = load_recipe("demo", ["stages.long_sft.data.task_args.n_train=20"])
    cfg = next(s for s in recipe.stages if s.name == "long_sft")
    assert cfg.data.mix and cfg.data.mix[0].task == "arithmetic"
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, mix=[dataclasses.replace(cfg.data.mix[0], max_examples=30)]))
    ctx = _stage_ctx(tok, tmp_path, recipe)
    extra = mix_examples(ctx, cfg)
    assert len(extra) == 30
    texts = [tok.decode(ex.input_ids) for ex in extra]
    assert all(("+" in t or "-" in t) and "=" in t for t in texts)
    # the same arithmetic file the short stage trains on (same task arguments -> same folder)
    arith = load_records(next((tmp_path / "data").glob("arithmetic-*")) / "sft_train.jsonl", "prompt_completion").records
    assert [ex.input_ids for ex in extra] == [ex.input_ids for ex in encode(arith[:30], tok, cfg.data)]
    # packed together with the needle rows, every target of both sources is trained once
    from posttrain.stages.common import load_split, resolve_data_paths

    train_path, _ = resolve_data_paths(ctx, cfg.data, "sft")
    needle = encode(load_split(train_path, cfg.data, ctx.console), tok, cfg.data)
    rows = training_units(needle + extra, cfg.data)
    assert sum(n_targets(r) for r in rows) == sum(n_targets(ex) for ex in needle + extra)


@pytest.mark.parametrize("mix, match", [
    ({"task": "arithmetic", "train": "x.jsonl"}, r"set exactly one of task"),
    ({"task": "sudoku"}, r"mix\[0\]\.task: unknown task 'sudoku'"),
    ({"train": "/no/such.jsonl"}, r"mix\[0\]\.train: file not found"),
    ({"task": "arithmetic", "max_examples": 0}, r"mix\[0\]\.max_examples: must be positive"),
    ({"task": "arithmetic", "max_exmaples": 3}, r"max_examples"),
])
def test_data_mix_errors_name_the_key(tmp_path, mix, match):
    import yaml

    raw = yaml.safe_load(open(recipe_path("demo")))
    raw["stages"][0]["data"]["mix"] = [mix]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=match):
        load_recipe(str(path))


def test_data_mix_only_in_sft_stages(tmp_path):
    import yaml

    raw = yaml.safe_load(open(recipe_path("demo")))
    dpo = next(i for i, s in enumerate(raw["stages"]) if s["kind"] == "dpo")
    raw["stages"][dpo]["data"]["mix"] = [{"task": "arithmetic"}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"stages\[{dpo}\]\.data\.mix: only sft stages mix"):
        load_recipe(str(path))


def test_config_pack_in_dpo_counts_pairs_and_keeps_documents_whole():
    cfg = _demo_with("stages.dpo.data.pack=true", "stages.dpo.data.max_seq_len=256")
    names = [s.name for s in cfg.stages]
    dpo, grpo = names.index("dpo"), names.index("grpo")
    assert cfg.stages[dpo].data.pack and cfg.stages[dpo].batch.micro_size > 1  # pairs per micro-batch
    with pytest.raises(ConfigError, match=rf"stages\[{dpo}\]\.data\.pack_mode: dpo packs whole documents"):
        _demo_with("stages.dpo.data.pack=true", "stages.dpo.data.pack_mode=split")
    with pytest.raises(ConfigError, match=rf"stages\[{grpo}\]\.data\.pack: only sft and dpo stages"):
        _demo_with("stages.grpo.data.pack=true")


def test_held_out_eval_scores_cells_for_needle_rows_and_plain_accuracy_otherwise(tok, tmp_path):
    """Every stage kind scores its eval through held_out_eval. Reference: the model's own greedy
    outputs, computed here directly; half the rows get that output as their answer (hits), the
    other half a different one, so the expected accuracy and every cell's are known exactly."""
    from posttrain.config import EvalConfig
    from posttrain.data import encode_prompt
    from posttrain.evals import held_out_eval
    from posttrain.rollout import SamplingParams, generate_on_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-hybrid", overrides={"num_hidden_layers": 2}), vocab_size=tok.vocab_size,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).eval()
    files = write_task("needle", tmp_path / "needle", n_train=2, n_eval_per_cell=2, lengths=[40, 96], depths=[0.0, 1.0], seed=1)
    rows = load_records(files["rl_eval"], "rl").records
    greedy = SamplingParams(temperature=0.0, max_new_tokens=3, stop_token_ids=(tok.eos_token_id,))
    outs = generate_on_model(model, [encode_prompt(r, tok) for r in rows], greedy)
    own = [tok.decode(o, skip_special_tokens=True) for o in outs]
    rows = [dataclasses.replace(r, answer=own[i] if i % 2 == 0 else own[i] + "x") for i, r in enumerate(rows)]

    class RankZero:  # LearnerGroup.call_rank0 on the local model
        @staticmethod
        def call_rank0(fn, *args):
            return fn(model, *args)

    ctx = _stage_ctx(tok, tmp_path, load_recipe(recipe_path("demo")))
    cfg = EvalConfig(every=0, max_new_tokens=3)
    m = held_out_eval(ctx, RankZero, rows, None, cfg, stage="rl", step=7)
    assert m["accuracy"] == 0.5 and m["n"] == 8
    assert [(c["length"], c["depth"], c["accuracy"], c["n"]) for c in m["needle"]["cells"]] == [
        (40, 0.0, 0.5, 2), (40, 1.0, 0.5, 2), (96, 0.0, 0.5, 2), (96, 1.0, 0.5, 2)]
    assert m["needle"]["plot"].endswith("rl_needle_step7.png")
    # rows without (length, depth): plain exact match on the first `limit` rows
    plain = [dataclasses.replace(r, meta={}) for r in rows]
    assert held_out_eval(ctx, RankZero, plain, None, dataclasses.replace(cfg, limit=3), stage="rl", step=0) == {
        "accuracy": 2 / 3, "n": 3}
    assert held_out_eval(ctx, RankZero, [], None, cfg, stage="rl", step=0) == {}


def test_a_later_eval_reports_its_paired_gain_over_the_stage_start(tok, tmp_path):
    """held_out_eval keeps each eval's per-row hits beside the stage; an eval after step 0 of the
    same rows reports the change since step 0 (paired_gain). Reference: the model's own greedy
    outputs with 3 and with 1 new tokens, computed here. Even rows take the 1-token output as
    their answer, odd rows the 3-token one; step 0 decodes 3 tokens, step 5 one token, so the
    rows that are right at each step are known without the eval."""
    from posttrain.config import EvalConfig
    from posttrain.data import encode_prompt
    from posttrain.evals import held_out_eval, paired_gain
    from posttrain.rollout import SamplingParams, generate_on_model

    torch.manual_seed(1)
    model = build_model(ModelConfig(preset="tiny-hybrid", overrides={"num_hidden_layers": 2}), vocab_size=tok.vocab_size,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).eval()
    files = write_task("needle", tmp_path / "needle", n_train=2, n_eval_per_cell=3, lengths=[40, 96], depths=[0.0, 1.0], seed=2)
    rows = load_records(files["rl_eval"], "rl").records

    def own(new_tokens):
        greedy = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, stop_token_ids=(tok.eos_token_id,))
        return [tok.decode(o, skip_special_tokens=True) for o in generate_on_model(model, [encode_prompt(r, tok) for r in rows], greedy)]

    three, one = own(3), own(1)
    rows = [dataclasses.replace(r, answer=one[i] if i % 2 == 0 else three[i]) for i, r in enumerate(rows)]
    before = [r.answer == t for r, t in zip(rows, three)]
    after = [r.answer == o for r, o in zip(rows, one)]
    assert sum(before) < len(rows) and sum(after) < len(rows) and before != after

    class RankZero:
        @staticmethod
        def call_rank0(fn, *args):
            return fn(model, *args)

    ctx = _stage_ctx(tok, tmp_path, load_recipe(recipe_path("demo")))
    cfg = EvalConfig(every=0, max_new_tokens=3)
    for plain in (False, True):  # needle cells, then plain exact match (rows without length/depth)
        these = [dataclasses.replace(r, meta={}) for r in rows] if plain else rows
        stage = "plain" if plain else "rl"
        start = held_out_eval(ctx, RankZero, these, None, cfg, stage=stage, step=0)
        assert start["accuracy"] == sum(before) / len(rows) and "gain" not in start
        end = held_out_eval(ctx, RankZero, these, None, dataclasses.replace(cfg, max_new_tokens=1), stage=stage, step=5)
        assert end["accuracy"] == sum(after) / len(rows)
        assert end["gain"] == paired_gain(before, after)
        assert end["gain"]["improved"] == sum(a and not b for a, b in zip(after, before)) > 0
        assert end["gain"]["regressed"] == sum(b and not a for a, b in zip(after, before)) > 0
        hits = json.loads((ctx.stage_dir / "eval" / f"{stage}-step5.json").read_text())["hits"]
        assert hits == [int(h) for h in after]
    # other rows (another answer) at a later step: no pairing with step 0's rows
    other = [dataclasses.replace(r, answer=r.answer + "x") for r in rows]
    assert "gain" not in held_out_eval(ctx, RankZero, other, None, cfg, stage="rl", step=9)


def test_sampled_eval_scores_mean_at_k_and_pairs_it_with_common_random_numbers(tok, tmp_path):
    """eval.sampled: each row's score is the share of its k samples (temperature T, the recipe
    seed) that are right. Reference: the same request made here directly with generate_on_model;
    row i's answer is its own first sample, so every score is >= 1/k and known. A second eval of
    an unchanged model draws the very same samples (seeded per prompt and sample): a paired gain
    of exactly 0 with no row moved. After the LM head changes, the gain equals paired_gain of the
    two reference score lists. The next stage (another stage seed) starting from that model
    draws the same samples again: its step 0 is this stage's end."""
    from posttrain.config import EvalConfig
    from posttrain.data import encode_prompt
    from posttrain.evals import SampledEval, held_out_eval, paired_gain
    from posttrain.rollout import SamplingParams, generate_on_model

    torch.manual_seed(2)
    model = build_model(ModelConfig(preset="tiny-hybrid", overrides={"num_hidden_layers": 2}), vocab_size=tok.vocab_size,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).eval()
    with torch.no_grad():  # a peaked next-token distribution, so samples often repeat
        model.get_output_embeddings().weight.mul_(20.0)
    files = write_task("needle", tmp_path / "needle", n_train=2, n_eval_per_cell=2, lengths=[40, 96], depths=[0.0, 1.0], seed=4)
    rows = load_records(files["rl_eval"], "rl").records
    ctx = dataclasses.replace(_stage_ctx(tok, tmp_path, load_recipe(recipe_path("demo"))), seed=3)  # stage 3
    assert ctx.seed != ctx.run_seed
    k, T = 6, 1.0

    def reference():
        params = SamplingParams(n=k, temperature=T, max_new_tokens=1, seed=ctx.run_seed, stop_token_ids=(tok.eos_token_id,))
        outs = generate_on_model(model, [encode_prompt(r, tok) for r in rows], params)
        return [[tok.decode(o, skip_special_tokens=True) for o in outs[i * k:(i + 1) * k]] for i in range(len(rows))]

    first = reference()
    rows = [dataclasses.replace(r, answer=first[i][0]) for i, r in enumerate(rows)]
    before = [sum(t == r.answer for t in texts) / k for r, texts in zip(rows, first)]
    assert len(set(before)) > 1  # rows differ: the scores are not all 1/k or all 1

    class RankZero:
        @staticmethod
        def call_rank0(fn, *args):
            return fn(model, *args)

    cfg = EvalConfig(every=0, max_new_tokens=1, sampled=SampledEval(n=k, temperature=T))
    start = held_out_eval(ctx, RankZero, rows, None, cfg, stage="rl", step=0)
    assert start["sampled"] == {"accuracy": pytest.approx(sum(before) / len(rows)), "k": k, "temperature": T}
    assert "sampled_gain" not in start
    same = held_out_eval(ctx, RankZero, rows, None, cfg, stage="rl", step=3)
    assert same["sampled_gain"]["delta"] == 0 and same["sampled_gain"]["improved"] == same["sampled_gain"]["regressed"] == 0
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(0.5 * torch.randn_like(model.get_output_embeddings().weight))
    after = [sum(t == r.answer for t in texts) / k for r, texts in zip(rows, reference())]
    assert after != before
    end = held_out_eval(ctx, RankZero, rows, None, cfg, stage="rl", step=5)
    assert end["sampled_gain"] == paired_gain(before, after)
    following = dataclasses.replace(ctx, seed=4, stage_dir=tmp_path / "next")  # the next stage, same model
    assert held_out_eval(following, RankZero, rows, None, cfg, stage="rl2", step=0)["sampled"] == end["sampled"]
    # another k is another metric: not paired with step 0's scores
    other = held_out_eval(ctx, RankZero, rows, None, dataclasses.replace(cfg, sampled=SampledEval(n=k + 1)), stage="rl", step=6)
    assert "sampled_gain" not in other and other["sampled"]["k"] == k + 1


def test_sampled_eval_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"stages\[3\]\.eval\.sampled\.temperature: must be a finite number > 0"):
        _demo_with("stages.grpo.eval.sampled.temperature=0")
    with pytest.raises(ConfigError, match=r"stages\[3\]\.eval\.sampled\.n: must be >= 1"):
        _demo_with("stages.grpo.eval.sampled.n=0")


def test_paired_gain_against_a_one_sample_reference():
    """paired_gain's se is the standard error of the mean of d_i = after_i - before_i; the
    reference computes it with the statistics module. Swapping before and after negates delta
    and z and keeps se; rows that do not change add nothing to the noise."""
    import math
    import random
    import statistics

    from posttrain.evals import paired_gain

    before = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    after = [1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
    g = paired_gain(before, after)
    assert (g["start"], g["end"], g["n"], g["improved"], g["regressed"]) == (0.6, 0.9, 10, 3, 0)
    assert g["delta"] == pytest.approx(0.3)
    assert g["se"] == pytest.approx(math.sqrt((3 * 0.7 ** 2 + 7 * 0.3 ** 2) / 9 / 10))  # 0.1528
    assert g["z"] == pytest.approx(0.3 / 0.15275, rel=1e-4)

    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 200)
        b = [rng.random() < 0.4 for _ in range(n)]
        a = [x if rng.random() < 0.8 else rng.random() < 0.6 for x in b]
        d = [int(y) - int(x) for x, y in zip(b, a)]
        g, back = paired_gain(b, a), paired_gain(a, b)
        assert g["delta"] == pytest.approx(statistics.fmean(d)) == pytest.approx(sum(a) / n - sum(b) / n)
        assert g["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(n))
        assert back["delta"] == pytest.approx(-g["delta"]) and back["se"] == pytest.approx(g["se"])
        assert g["z"] is None or back["z"] == pytest.approx(-g["z"])
        # 1000 more rows that do not change shrink delta and se alike: z stays about the same (they
        # are evidence neither way), where an unpaired z would grow with the common rows
        more = paired_gain(b + [True] * 1000, a + [True] * 1000)
        if g["z"] is not None:
            assert more["z"] == pytest.approx(g["z"], rel=0.25)

    assert paired_gain([1, 0, 1], [1, 0, 1])["z"] is None  # nothing changed: se 0
    one = paired_gain([0], [1])
    assert one["delta"] == 1.0 and one["se"] is None and one["z"] is None
    with pytest.raises(ValueError, match="equally long"):
        paired_gain([1, 0], [1])


def test_paired_gain_of_preference_scores_with_ties():
    """Scores in [0, 1] (a preference pair: 1 ranked right, 0.5 tied, 0 wrong) pair the same
    way as hits: delta and se against the statistics module, a half step counts as a move."""
    import math
    import statistics

    from posttrain.evals import paired_gain

    before = [0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 0.5, 1.0]
    after = [1.0, 1.0, 0.5, 0.0, 0.5, 1.0, 1.0, 1.0]
    d = [a - b for b, a in zip(before, after)]
    g = paired_gain(before, after)
    assert (g["start"], g["end"], g["n"]) == (4.5 / 8, 6.0 / 8, 8)
    assert (g["improved"], g["regressed"]) == (4, 1)
    assert g["delta"] == pytest.approx(statistics.fmean(d)) == pytest.approx(0.1875)
    assert g["se"] == pytest.approx(statistics.stdev(d) / math.sqrt(8))
    with pytest.raises(ValueError, match=r"after holds 1\.5"):
        paired_gain([0.5, 1.0], [1.5, 1.0])
