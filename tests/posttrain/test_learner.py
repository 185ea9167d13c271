"""The DeepSpeed learner's update equals the update of the global-batch loss.

Reference: a plain PyTorch copy of the same model, loss = sum of target-token NLL over the
whole global batch / its token count, one torch AdamW step. AdamW with eps=1 is used so the
update depends on the gradient's *scale* (with a tiny eps, Adam's first step is ~lr*sign(g)
and would hide a wrong normaliser).

Checked: one micro-batch of 8 (1x8), eight micro-batches of 1 (8x1), and two learner
processes with ZeRO-2 (world size 2, 4 sequences each, unequal token counts) — all on Ray.
"""
from __future__ import annotations

import os

import pytest
import torch

from posttrain.config import ClusterConfig, LearnerConfig, ModelConfig, OptimConfig, ScheduleConfig
from posttrain.data import build_tokenizer, collate, encode_sft, load_records, write_task
from posttrain.models import build_model, forward_hidden, token_logprobs
from posttrain.data import token_ids
from posttrain.learner import live_engines, prebuild_ops, torch_extensions_dir

# The router loss is not additive over micro-batches (a product of batch means), so it is
# switched off here; the objective weights it per micro-batch by token share.
MODEL = ModelConfig(preset="tiny-hybrid", overrides={"router_aux_loss_coef": 0.0})
OPTIM = OptimConfig(lr=1e-2, eps=1.0, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1e9)
SCHED = ScheduleConfig(kind="constant")
SEED = 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    tok = build_tokenizer("char")
    files = write_task("arithmetic", tmp_path_factory.mktemp("d"), n_train=64, n_eval=8, seed=0)
    recs = load_records(files["sft_train"], "prompt_completion").records[:8]
    examples = [encode_sft(r, tok, max_len=64) for r in recs]
    assert len({ex.n_trained for ex in examples}) > 1, "want unequal token counts per sequence"
    return tok, examples


def reference_update(tok, *parts) -> dict[str, torch.Tensor]:
    """Plain torch: for each part (a stage), one step of a new AdamW on that part's loss."""
    torch.manual_seed(SEED)
    model = build_model(MODEL, **token_ids(tok))
    for examples in parts:
        batch = collate(examples, tok.pad_token_id)
        hidden, aux = forward_hidden(model, batch.input_ids, position_ids=batch.position_ids)
        logp = token_logprobs(model, hidden, batch.targets)
        mask = batch.targets != -100
        loss = -(logp * mask).sum() / mask.sum() + 0.0 * aux
        loss.backward()
        opt = torch.optim.AdamW(model.parameters(), lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps, weight_decay=0.0)
        opt.step()
        model.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def learner_update(tok, examples, *, learners: int, micro: int, zero: int) -> dict[str, torch.Tensor]:
    from posttrain.cluster import LearnerGroup
    from posttrain.objectives import SFTObjective, StepCounts
    from posttrain.stages.common import shard

    group = LearnerGroup(ClusterConfig(learners=learners, cpus_per_learner=0.5), MODEL, None,
                         token_ids=token_ids(tok), seed=SEED)
    try:
        group.configure(OPTIM, SCHED, LearnerConfig(zero_stage=zero), 10)
        per_rank = [[collate(mb, tok.pad_token_id) for mb in rank] for rank in shard(examples, learners, micro)]
        num_tokens = sum(ex.n_trained for ex in examples)
        group.train_step(SFTObjective(), per_rank, StepCounts(tokens=num_tokens))
        return group.state_dict()
    finally:
        group.shutdown()


def max_rel_diff(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-8)).item() for k in b)


def test_update_changes_weights_and_matches_reference(setup):
    tok, examples = setup
    torch.manual_seed(SEED)
    init = build_model(MODEL, **token_ids(tok)).state_dict()
    ref = reference_update(tok, examples)
    assert max_rel_diff(ref, init) > 1e-4  # the step did move the weights
    one_by_eight = learner_update(tok, examples, learners=1, micro=8, zero=0)
    assert max_rel_diff(one_by_eight, ref) < 1e-5


def test_deepspeed_ops_are_built_once_per_install_and_learners_reuse_them(setup, monkeypatch):
    """`make install` runs prebuild_ops; a learner started afterwards loads the op from this
    install's own directory and compiles nothing (the library is not rewritten)."""
    if torch.cuda.is_available():
        pytest.skip("the op is DeepSpeed's CPU (gloo) shared-memory collective")
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        pytest.skip("TORCH_EXTENSIONS_DIR is set: the user's directory is used as is")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))  # what prebuild_ops sets
    so = prebuild_ops()
    assert so is not None and so.is_file() and torch_extensions_dir() in so.parents, so
    built = so.stat().st_mtime_ns
    from posttrain.cluster import LearnerGroup

    tok, _ = setup
    group = LearnerGroup(ClusterConfig(learners=1, cpus_per_learner=0.5), MODEL, None, token_ids=token_ids(tok), seed=SEED)
    try:
        [info] = group.placements()
    finally:
        group.shutdown()
    assert info["torch_extensions_dir"] == str(torch_extensions_dir())
    assert so.stat().st_mtime_ns == built


def test_grad_accumulation_8x1_equals_1x8(setup):
    tok, examples = setup
    a = learner_update(tok, examples, learners=1, micro=8, zero=0)
    b = learner_update(tok, examples, learners=1, micro=1, zero=0)
    assert max_rel_diff(b, a) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="two ranks take one GPU each (NCCL): needs 2 GPUs (or none)")
def test_world_size_2_zero2_equals_single_process(setup):
    tok, examples = setup
    ref = reference_update(tok, examples)
    two = learner_update(tok, examples, learners=2, micro=2, zero=2)
    assert max_rel_diff(two, ref) < 1e-5


def test_a_new_stage_on_the_same_learner_equals_fresh_optimizers(setup):
    """configure() a second time (a new stage on learners kept from the last one: the pipeline's
    cluster.reuse_learners) keeps the weights and starts a new optimizer: two stages on one
    ZeRO-2 learner equal plain torch with a new AdamW per stage, and the first stage's engine is
    freed (found on the H200: each kept stage held the last one's optimizer state)."""
    from posttrain.cluster import LearnerGroup
    from posttrain.objectives import SFTObjective, StepCounts

    tok, examples = setup
    first, second = examples[:4], examples[4:]
    want = reference_update(tok, first, second)

    group = LearnerGroup(ClusterConfig(learners=1, cpus_per_learner=0.5), MODEL, None,
                         token_ids=token_ids(tok), seed=SEED)
    try:
        for part in (first, second):
            group.configure(OPTIM, SCHED, LearnerConfig(zero_stage=2), 10)
            per_rank = [[collate(part, tok.pad_token_id)]]
            group.train_step(SFTObjective(), per_rank, StepCounts(tokens=sum(ex.n_trained for ex in part)))
        got = group.state_dict()
        # the first stage's engine and its optimizer state are gone (its forward hooks on the
        # module held them: 2.5 GiB more per kept stage on the H200 recipe)
        assert group.call_rank0(lambda _model: live_engines()) == 1
    finally:
        group.shutdown()
    torch.manual_seed(SEED)
    assert max_rel_diff(want, build_model(MODEL, **token_ids(tok)).state_dict()) > 1e-4  # the steps moved
    assert max_rel_diff(got, want) < 1e-5


def test_step_metrics_are_summed_over_micro_batches_and_read_back_once():
    """A step's metric sums (tensors kept on their device until after the optimizer step, then
    read back in one copy; Python numbers as they are) equal the per-micro-batch sums, in the
    order the objective first reported them; Gathered outputs are listed, not summed."""
    from posttrain.learner import _accumulate, _as_floats
    from posttrain.objectives.common import Gathered

    totals, gathered = {}, {}
    _accumulate(totals, gathered, {"loss": torch.tensor(0.25), "tokens": 3, "ids": Gathered(torch.tensor([1, 2]))})
    _accumulate(totals, gathered, {"loss": torch.tensor(0.5, dtype=torch.bfloat16), "tokens": 4.0,
                                   "ids": Gathered(torch.tensor([3]))})
    out = _as_floats(totals)
    assert out == {"loss": 0.75, "tokens": 7.0} and list(out) == ["loss", "tokens"]
    assert all(type(v) is float for v in out.values())
    assert [t.tolist() for t in gathered["ids"]] == [[1, 2], [3]]


def test_profile_window_reports_each_phase_per_step_and_changes_no_update(setup, tmp_path):
    """learner.profile [2, 3] over four steps of four micro-batches: the rank's report gives each
    phase's calls per step (forward and backward per micro-batch, one optimizer step, one read
    back), a trace is written, and the weights equal those of the same steps unprofiled."""
    import gzip
    import json

    from posttrain.cluster import LearnerGroup
    from posttrain.objectives import SFTObjective, StepCounts

    tok, examples = setup
    per_rank = [[collate(examples[i:i + 2], tok.pad_token_id) for i in range(0, 8, 2)]]
    counts = StepCounts(tokens=sum(ex.n_trained for ex in examples))

    def four_steps(learner_cfg: LearnerConfig, profile_dir) -> dict[str, torch.Tensor]:
        group = LearnerGroup(ClusterConfig(learners=1, cpus_per_learner=0.5), MODEL, None,
                             token_ids=token_ids(tok), seed=SEED)
        try:
            group.configure(OPTIM, SCHED, learner_cfg, 10, profile_dir=profile_dir)
            for _ in range(4):
                group.train_step(SFTObjective(), per_rank, counts)
            group.close_profile()  # the stage's end (finish_stage)
            return group.state_dict()
        finally:
            group.shutdown()

    out = tmp_path / "profile"
    profiled = four_steps(LearnerConfig(profile=(2, 3)), str(out))
    plain = four_steps(LearnerConfig(), None)
    assert max_rel_diff(profiled, plain) == 0.0
    report = (out / "rank0.txt").read_text()
    assert report.startswith("# rank 0, optimizer steps 2-3 of the window 2-3\n")
    calls = {}
    for line in report.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) == 4 and cells[0] in ("forward", "backward", "optimizer_step", "metrics_readback"):
            calls[cells[0]] = float(cells[3])
            assert float(cells[1]) > 0  # host ms per step
    assert calls == {"forward": 4, "backward": 4, "optimizer_step": 1, "metrics_readback": 1}
    assert "top operators by self host time" in report and "aten::" in report
    trace = json.loads(gzip.decompress((out / "rank0.trace.json.gz").read_bytes()))
    assert any(e.get("name") == "posttrain/optimizer_step" for e in trace["traceEvents"])
    assert sorted(p.name for p in out.iterdir()) == ["rank0.trace.json.gz", "rank0.txt"]  # steps 1 and 4: nothing
    # a window past the stage's last update (rl steps without an informative group make none): the
    # stage's end reports the steps it got
    four_steps(LearnerConfig(profile=(3, 6)), str(tmp_path / "short"))
    assert (tmp_path / "short" / "rank0.txt").read_text().startswith(
        "# rank 0, optimizer steps 3-4 of the window 3-6 (the stage ended before the window's last step)")


@pytest.mark.parametrize("metrics, bad", [({"loss": 0.5, "grad_norm": 3.0}, False), ({"loss": 0.5}, False),
                                          ({"loss": float("nan"), "grad_norm": 1.0}, True),
                                          ({"loss": 0.5, "grad_norm": float("inf")}, True)])
def test_a_non_finite_loss_or_grad_norm_stops_the_stage_naming_the_step(metrics, bad):
    """DeepSpeed applies a step with non-finite gradients (fp32; bf16 without its overflow scan):
    every stage stops there with one line that names the stage and the step, its row logged."""
    from types import SimpleNamespace

    from posttrain.stages.common import check_finite

    logged = []
    ctx = SimpleNamespace(logger=SimpleNamespace(log=lambda *row: logged.append(row)))
    if not bad:
        check_finite(ctx, "sft", 3, {**metrics, "old_logprobs": [torch.zeros(2)]})
        assert logged == []  # the stage logs its own rows
        return
    with pytest.raises(RuntimeError, match=r"^sft: step 3: non-finite loss .* resume from the last checkpoint"):
        check_finite(ctx, "sft", 3, {**metrics, "old_logprobs": [torch.zeros(2)]})
    assert logged == [("sft", "train", 3, metrics)]  # the bad step's row is on record, lists left out


def test_bf16_engines_skip_deepspeeds_per_gradient_overflow_scan():
    """bf16 engines run without DeepSpeed's inf/NaN scan of every gradient before each step
    (check_finite stops a non-finite step instead), as DeepSpeed itself reads the config; fp32
    and fp16 (whose loss scale needs the scan) are left as they were."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from posttrain.learner import deepspeed_config

    bf16 = DeepSpeedConfig(deepspeed_config(OPTIM, LearnerConfig(zero_stage=1), "bfloat16", 1))
    assert bf16.bfloat16_config.enabled and bf16.bfloat16_config.check_grad_overflow is False
    fp32 = DeepSpeedConfig(deepspeed_config(OPTIM, LearnerConfig(zero_stage=1), "float32", 1))
    assert not fp32.bfloat16_config.enabled and "bf16" not in deepspeed_config(OPTIM, LearnerConfig(), "float32", 1)
    assert deepspeed_config(OPTIM, LearnerConfig(), "float16", 1)["fp16"] == {"enabled": True}
