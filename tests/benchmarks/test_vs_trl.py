"""benchmarks/vs_trl.py compares like with like: the recipe posttrain runs and the config TRL
gets agree on every shared setting (built from the script's own functions, no training)."""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_trl.py"


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_trl"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(vs_trl, tmp_path_factory):
    work = tmp_path_factory.mktemp("vs_trl")
    s = vs_trl.PRESETS["cpu"]
    return s, work, vs_trl.prepare(work, s, ["qwen2"])


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo", "cispo"])
def test_recipe_and_trl_config_agree(vs_trl, inputs, stage, one_thread):
    import trl

    from posttrain.config import load_recipe

    s, work, paths = inputs
    raw = vs_trl.posttrain_recipe(s, "qwen2", stage, paths, str(work / "run"))
    (work / f"{stage}.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(str(work / f"{stage}.yaml"))  # the checks `posttrain run` makes
    (st,) = recipe.stages
    config_cls = {"sft": trl.SFTConfig, "dpo": trl.DPOConfig}.get(stage, trl.GRPOConfig)
    t = config_cls(**vs_trl.trl_config(s, stage, str(work / "trl")))

    assert recipe.model.path == paths["qwen2"] and recipe.model.dtype == "float32" and not t.bf16
    assert recipe.cluster.torch_threads == s.threads
    assert st.steps == t.max_steps == s.warmup + s.steps
    o = st.optim
    assert (o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip) == (
        t.learning_rate, (t.adam_beta1, t.adam_beta2), t.adam_epsilon, t.weight_decay, t.max_grad_norm)
    assert st.schedule.kind == "constant" and st.schedule.warmup_steps == 0
    assert getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type) == "constant" and t.warmup_steps == 0
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if stage in ("sft", "dpo"):
        assert (st.batch.global_size, st.batch.micro_size) == (per_step, t.per_device_train_batch_size)
        assert st.data.max_seq_len == t.max_length
    if stage == "dpo":
        assert st.loss.beta == t.beta and st.loss.kind == "sigmoid" and t.loss_type == ["sigmoid"]
        assert t.precompute_ref_log_probs  # posttrain computes reference log-probs once, before step 1
    if stage in ("grpo", "cispo"):
        assert st.prompts_per_step * st.sampling.n == per_step == t.generation_batch_size
        assert st.micro_size == t.per_device_train_batch_size and st.sampling.n == t.num_generations
        sp = st.sampling
        assert (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k) == (
            t.max_completion_length, t.temperature, t.top_p, t.top_k)
        assert st.updates_per_batch == t.num_iterations == 1
        assert t.beta == 0.0 and not st.loss.needs_reference and not t.use_vllm
        assert not st.filters.dynamic_sampling and not st.filters.mask_truncated and not t.mask_truncated_completions
        assert recipe.model.fp32_lm_head and t.cast_lm_head_to_fp32
        assert t.loss_type == stage == st.loss.kind
        if stage == "grpo":
            assert (st.loss.clip_low, st.loss.clip_high) == (t.epsilon, t.epsilon_high)
            assert st.loss.aggregation == "seq_mean"  # TRL's "grpo": each sequence's mean, then the batch mean
        else:  # TRL clamps the IS weight at epsilon_high, posttrain at 1 + eps_high
            assert 1 + st.loss.eps_high == t.epsilon_high
    else:
        assert not recipe.model.fp32_lm_head  # TRL's SFT/DPO trainers have no fp32 LM head


def test_cuda_settings_match_precision(vs_trl, inputs):
    s = dataclasses.replace(vs_trl.PRESETS["cuda"])
    _, work, paths = inputs
    for stage in ("sft", "grpo"):
        raw = vs_trl.posttrain_recipe(s, "qwen2", stage, paths, str(work / "run"))
        t = vs_trl.trl_config(s, stage, str(work / "trl"))
        assert raw["model"]["dtype"] == "bfloat16" and t["bf16"] and not t["use_cpu"]
        assert raw["stages"][0]["learner"]["zero_stage"] == 1  # as recipes/gpu.yaml
    assert (s.prompts, s.group, s.max_new_tokens) == (8, 8, 128)  # the shape of issue 16's measurement


def test_eager_decode_only_on_posttrains_rl_rows_and_trls_static_cache_on_request(vs_trl, inputs):
    """posttrain's default decode (CUDA graphs on CUDA: the native engine's for the hybrid, the
    hf engine's compiled static-cache step for qwen2) unless --eager-decode, which pins
    rollout.cuda_graphs false on every RL row; --trl-static-cache gives TRL's RL rows
    transformers' static cache (its compiled decode), TRL's default being the dynamic cache."""
    _, work, paths = inputs
    paths = {**paths, "hybrid": paths["qwen2"]}  # the path is not read here
    default = vs_trl.PRESETS["cuda"]
    for family in ("hybrid", "qwen2"):
        assert "rollout" not in vs_trl.posttrain_recipe(default, family, "cispo", paths, str(work / "run"))["stages"][0]
    s = dataclasses.replace(default, cuda_graphs=False)
    for family in ("hybrid", "qwen2"):
        rl = vs_trl.posttrain_recipe(s, family, "cispo", paths, str(work / "run"))["stages"][0]
        assert rl["rollout"] == {"cuda_graphs": False}
    assert "rollout" not in vs_trl.posttrain_recipe(s, "hybrid", "sft", paths, str(work / "run"))["stages"][0]
    assert "cache_implementation" not in vs_trl.trl_config(default, "grpo", str(work / "trl"))
    static = dataclasses.replace(default, trl_static_cache=True)
    assert vs_trl.trl_config(static, "grpo", str(work / "trl"))["cache_implementation"] == "static"
    assert "cache_implementation" not in vs_trl.trl_config(static, "sft", str(work / "trl"))


def test_async_rl_only_on_posttrains_rl_rows(vs_trl, inputs):
    """--async-rl: posttrain's RL stage runs one step off-policy with the TIS correction, and the
    recipe it gets validates; SFT/DPO rows and TRL's config do not change."""
    from posttrain.config import load_recipe

    _, work, paths = inputs
    s = dataclasses.replace(vs_trl.PRESETS["cpu"], async_rl=True)
    for stage in ("grpo", "cispo"):
        raw = vs_trl.posttrain_recipe(s, "qwen2", stage, paths, str(work / "run"))
        (work / "async.yaml").write_text(yaml.safe_dump(raw))
        (st,) = load_recipe(str(work / "async.yaml")).stages  # the checks `posttrain run` makes
        assert st.async_rollout is not None and st.async_rollout.max_staleness == 1
        assert st.correction is not None and st.correction.mode == "tis"
    assert "async_rollout" not in vs_trl.posttrain_recipe(s, "qwen2", "sft", paths, str(work / "run"))["stages"][0]
    sync = vs_trl.PRESETS["cpu"]
    assert vs_trl.trl_config(s, "grpo", "o") == vs_trl.trl_config(sync, "grpo", "o")
    assert "async_rollout" not in vs_trl.posttrain_recipe(sync, "qwen2", "grpo", paths, str(work / "run"))["stages"][0]


def test_a_side_left_out_by_sides_shows_in_the_table_without_a_ratio(vs_trl):
    """--sides trl: the rows hold TRL's result only; the table says the other side was not run."""
    (row,) = vs_trl.table_rows([{"family": "hybrid", "stage": "cispo", "trl": {"rate": 100.0, "step_s": 2.0}}])
    assert row[3] == "not run (--sides)" and row[4] == 100.0 and row[-1] == "-"


def test_the_json_says_how_each_side_decodes(vs_trl):
    cuda = vs_trl.PRESETS["cuda"]
    assert "torch.compile" in vs_trl.decode_setup(cuda)["posttrain"]
    assert "dynamic cache" in vs_trl.decode_setup(cuda)["trl"]
    assert "--eager-decode" in vs_trl.decode_setup(dataclasses.replace(cuda, cuda_graphs=False))["posttrain"]
    assert "static" in vs_trl.decode_setup(dataclasses.replace(cuda, trl_static_cache=True))["trl"]
    assert "eager" in vs_trl.decode_setup(vs_trl.PRESETS["cpu"])["posttrain"]


def test_profile_adds_two_untimed_steps_after_the_timed_ones_on_both_sides(vs_trl, inputs, one_thread):
    """--profile: both sides run two more optimizer steps, profiled (posttrain's learner.profile
    window), and only the steps between the warm-up and them are timed."""
    import trl

    from posttrain.config import load_recipe

    s, work, paths = inputs
    s = dataclasses.replace(s, profile=True)
    raw = vs_trl.posttrain_recipe(s, "qwen2", "sft", paths, str(work / "run"))
    (work / "profiled.yaml").write_text(yaml.safe_dump(raw))
    (st,) = load_recipe(str(work / "profiled.yaml")).stages
    t = trl.SFTConfig(**vs_trl.trl_config(s, "sft", str(work / "trl")))
    assert st.steps == t.max_steps == s.warmup + s.steps + 2
    assert st.learner.profile == s.profile_window == (s.warmup + s.steps + 1, s.warmup + s.steps + 2)
    assert [n for n in range(1, st.steps + 1) if s.timed(n)] == list(range(s.warmup + 1, s.warmup + s.steps + 1))
