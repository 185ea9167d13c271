"""Native engine against the transformers reference and against itself under other schedules."""
import pytest
import torch

from posttrain.models.hybrid import HybridForCausalLM
from posttrain.rollout.native import NativeEngine
from posttrain.rollout.types import SamplingParams


@pytest.fixture(scope="module")
def native_model(tiny_dir):
    return HybridForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def test_greedy_equals_hf_generate(tiny_engines, prompts):
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=16, stop_token_ids=(2,))
    hf = tiny_engines["hf"][0].generate(prompts, params)
    native = tiny_engines["native"][0].generate(prompts, params)
    assert [c.token_ids for c in native] == [c.token_ids for c in hf]
    assert [c.finish_reason for c in native] == [c.finish_reason for c in hf]
    for a, b in zip(native, hf):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_sampled_equals_hf_on_truncation_and_stops(tiny_engines, prompts):
    """Same sampled tokens are not expected (different RNG use), but given the native tokens the hf
    engine's post-hoc cut (stop ids, early truncation) must agree with native's online decisions."""
    from posttrain.rollout.hf_engine import finish_completion

    params = SamplingParams(n=3, temperature=0.05, max_new_tokens=24, seed=5,
                            stop_token_ids=(3,), early_stop_run=5, early_stop_prob=0.995)
    native = tiny_engines["native"][0].generate(prompts, params)
    assert {c.finish_reason for c in native} >= {"truncated"}
    untruncated = tiny_engines["native"][0].generate(
        prompts, SamplingParams(n=3, temperature=0.05, max_new_tokens=24, seed=5, stop_token_ids=(3,)))
    for c, full in zip(native, untruncated):
        ref = finish_completion(c.prompt_index, c.sample_index, full.token_ids, full.logprobs, params)
        assert (c.token_ids, c.finish_reason) == (ref.token_ids, ref.finish_reason)


@pytest.mark.parametrize("num_slots", [1, 2, 5])
def test_continuous_batching_matches_one_slot_per_request(native_model, prompts, num_slots):
    # Stop on a token greedy decoding of prompt 0 emits mid-way, so completion lengths differ.
    probe = NativeEngine(native_model, num_slots=4).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=14))
    params = SamplingParams(n=3, temperature=0.0, max_new_tokens=14, stop_token_ids=(probe[0].token_ids[4],))
    wide = NativeEngine(native_model, num_slots=len(prompts) * 3).generate(prompts, params)
    narrow = NativeEngine(native_model, num_slots=num_slots).generate(prompts, params)
    assert [c.token_ids for c in narrow] == [c.token_ids for c in wide]
    assert [c.finish_reason for c in narrow] == [c.finish_reason for c in wide]
    # completions of different lengths exist, so slots really were refilled mid-flight
    assert len({len(c.token_ids) for c in wide}) > 1


def test_seeded_sampling_independent_of_slot_count(native_model, prompts):
    params = SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=12, seed=9, stop_token_ids=(2, 3, 4))
    a = NativeEngine(native_model, num_slots=16).generate(prompts, params)
    b = NativeEngine(native_model, num_slots=3).generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # and independent of batch composition: prompt 1 alone at the same prompt index
    alone = NativeEngine(native_model, num_slots=2).generate(prompts[:2], params)
    assert [c.token_ids for c in alone] == [c.token_ids for c in a[:8]]


def test_max_len_caps_sequence(native_model, prompts):
    engine = NativeEngine(native_model, num_slots=2, max_len=12)
    out = engine.generate(prompts[:2], SamplingParams(temperature=0.0, max_new_tokens=50))
    for c in out:
        assert c.finish_reason == "length"
        assert len(prompts[c.prompt_index]) + len(c.token_ids) == 12
    with pytest.raises(ValueError, match="max_len=12"):
        engine.generate([list(range(1, 13))], SamplingParams(max_new_tokens=2))


def test_static_decode_step_in_the_engine_gives_the_same_completions(native_model, prompts, monkeypatch):
    """The step a CUDA graph replays (every slot computed, lengths moved only for active slots,
    MoE routed on the device), run eagerly through the engine's slot refills: same tokens and
    log-probs as decode_step. On CUDA, `cuda_graphs` replays exactly this step."""
    import posttrain.rollout.native as native
    from posttrain.models.decode import decode_step_static

    probe = NativeEngine(native_model, num_slots=4).generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=14))
    params = SamplingParams(n=3, temperature=0.0, max_new_tokens=14, stop_token_ids=(probe[0].token_ids[4],))
    eager = NativeEngine(native_model, num_slots=5).generate(prompts, params)
    monkeypatch.setattr(native, "decode_step", decode_step_static)
    static = NativeEngine(native_model, num_slots=5).generate(prompts, params)
    assert [c.token_ids for c in static] == [c.token_ids for c in eager]
    assert [c.finish_reason for c in static] == [c.finish_reason for c in eager]
    assert len({len(c.token_ids) for c in eager}) > 1  # slots were refilled mid-flight
    for a, b in zip(static, eager):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_switching_to_the_static_step_mid_run_after_a_warm_up_changes_nothing(native_model, prompts, monkeypatch):
    """What cuda_graphs does on CUDA, minus the graph: after CAPTURE_AFTER_STEPS eager steps the
    run warms the static step up on its live cache (no slot active) and continues on it. Same
    tokens and log-probs as a run that never switched: the warm-up left every slot as it was."""
    import posttrain.rollout.native as native

    def eager_static(model, cache):
        native.warm_up_static(model, cache, 2)
        return native.decode_step_static

    params = SamplingParams(n=3, temperature=0.0, max_new_tokens=3 * native.CAPTURE_AFTER_STEPS)
    plain = native._Run(native_model, 5, 40, prompts, params).run()
    monkeypatch.setattr(native, "GraphedDecode", eager_static)
    run = native._Run(native_model, 5, 40, prompts, params, cuda_graph=True)
    switched = run.run()
    assert run.captured and run.steps > native.CAPTURE_AFTER_STEPS + 2
    assert [c.token_ids for c in switched] == [c.token_ids for c in plain]
    for a, b in zip(switched, plain):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_cuda_graphs_is_the_native_and_hf_engines_setting(hf_tiny, native_model):
    from posttrain.rollout.worker import RolloutConfig, build_engine

    with pytest.raises(ValueError, match="^cuda_graphs: the native and hf engines' setting"):
        RolloutConfig(engine="vllm", cuda_graphs=True)
    RolloutConfig(engine="native", cuda_graphs=True)
    RolloutConfig(engine="hf", cuda_graphs=True)
    # transformers' MiniMax cannot compile whole: true is refused on it, null leaves it eager
    with pytest.raises(ValueError, match="cannot compile MiniMaxForCausalLM"):
        build_engine(hf_tiny, RolloutConfig(cuda_graphs=True))
    assert build_engine(hf_tiny, RolloutConfig()).static_decode is False
    # the default (null) applies where it can
    assert RolloutConfig().cuda_graphs is None and RolloutConfig(engine="hf").cuda_graphs is None
    assert build_engine(native_model, RolloutConfig()).cuda_graphs is None
    assert build_engine(native_model, RolloutConfig(cuda_graphs=False)).cuda_graphs is False


def test_generation_on_a_learners_weights_leaves_graphs_off_unless_asked(native_model, prompts, monkeypatch):
    """generate_on_model (held-out evals, DPO candidates on the learner) may meet ZeRO-3 gather
    hooks, which a capture must not: the null default means off there; true is passed on."""
    import posttrain.rollout.worker as worker

    seen = []
    real = worker.build_engine
    monkeypatch.setattr(worker, "build_engine", lambda model, config: seen.append(config.cuda_graphs) or real(model, config))
    params = SamplingParams(max_new_tokens=2)
    worker.generate_on_model(native_model, prompts, params)
    worker.generate_on_model(native_model, prompts, params, worker.RolloutConfig(max_slots=4))
    worker.generate_on_model(native_model, prompts, params, worker.RolloutConfig(cuda_graphs=True))
    assert seen == [False, False, True]


def test_a_failed_capture_decodes_eagerly_unless_graphs_are_required(native_model, prompts, monkeypatch):
    """cuda_graphs null (the recipe default): a capture that fails leaves the run's tokens as
    eager decoding gives them, warns once, and the engine stops trying; true: it raises."""
    import posttrain.rollout.native as native

    def no_capture(model, cache):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=3 * native.CAPTURE_AFTER_STEPS)
    plain = NativeEngine(native_model, num_slots=3).generate(prompts, params)
    monkeypatch.setattr(native, "GraphedDecode", no_capture)
    monkeypatch.setattr(native, "_on_cuda", lambda model: True)  # what the engine checks before capturing
    auto = NativeEngine(native_model, num_slots=3, cuda_graphs=None)
    with pytest.warns(RuntimeWarning, match=r"capture failed \(operation not permitted when stream is capturing\); "
                                            r"decoding eagerly"):
        out = auto.generate(prompts, params)
    assert [c.token_ids for c in out] == [c.token_ids for c in plain]
    assert auto.cuda_graphs is False and auto.graph_captures == 0
    with pytest.raises(RuntimeError, match="stream is capturing"):
        NativeEngine(native_model, num_slots=3, cuda_graphs=True).generate(prompts, params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU-only test)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_on_the_gpu(tiny_hybrid_d64, prompts, dtype):
    """cuda_graphs: the step captured mid-run (after CAPTURE_AFTER_STEPS eager steps, slots
    holding live sequences) and replayed through slot refills gives eager's greedy tokens; a
    second generate call (a new cache, a new capture) too; a call that ends before the capture
    point captures nothing."""
    import copy

    from posttrain.rollout.native import CAPTURE_AFTER_STEPS

    model = copy.deepcopy(tiny_hybrid_d64).to(device="cuda", dtype=dtype).eval()
    params = SamplingParams(n=3, temperature=0.0, max_new_tokens=3 * CAPTURE_AFTER_STEPS, stop_token_ids=(2,))
    eager = NativeEngine(model, num_slots=5).generate(prompts, params)
    assert max(len(c.token_ids) for c in eager) > CAPTURE_AFTER_STEPS + 2  # replays happen
    graphed_engine = NativeEngine(model, num_slots=5, cuda_graphs=True)
    for call in range(2):
        graphed = graphed_engine.generate(prompts, params)
        assert graphed_engine.graph_captures == call + 1
        assert [c.token_ids for c in graphed] == [c.token_ids for c in eager]
        assert [c.finish_reason for c in graphed] == [c.finish_reason for c in eager]
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for a, b in zip(graphed, eager):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=tol, rtol=0)
    # one wave of requests (4 <= 5 slots) that ends before the capture point
    short = SamplingParams(n=2, temperature=0.0, max_new_tokens=CAPTURE_AFTER_STEPS // 2)
    graphed_engine.generate(prompts[:2], short)
    assert graphed_engine.graph_captures == 2


def test_engine_and_model_pairs_are_checked_with_the_rules_the_workers_apply(hf_tiny, native_model):
    """check_engine (run when a recipe loads) refuses exactly what building the engine on the
    model would: native on a non-hybrid, cuda_graphs true on the hf engine for a model
    transformers cannot compile whole (its MiniMax); the model family picks the default."""
    from posttrain.rollout.worker import RolloutConfig, build_engine, check_engine

    never = lambda: pytest.fail("compilability asked although it cannot matter")  # noqa: E731
    check_engine(RolloutConfig(), minimax=True, hf_compiles=never)  # -> native
    check_engine(RolloutConfig(cuda_graphs=True), minimax=True, hf_compiles=never)  # native graphs
    check_engine(RolloutConfig(cuda_graphs=True), minimax=False, hf_compiles=lambda: True)  # hf, Qwen2-like
    with pytest.raises(ValueError, match="^engine: 'native' needs a MiniMax hybrid model"):
        check_engine(RolloutConfig(engine="native"), minimax=False, hf_compiles=never)
    with pytest.raises(ValueError, match="^cuda_graphs: true, but transformers cannot compile"):
        check_engine(RolloutConfig(engine="hf", cuda_graphs=True), minimax=True, hf_compiles=never)
    with pytest.raises(ValueError, match="^cuda_graphs: true"):
        check_engine(RolloutConfig(cuda_graphs=True), minimax=False, hf_compiles=lambda: False)
    # the same pair refused by the engine itself (transformers' MiniMax on the hf engine)
    with pytest.raises(ValueError, match="cannot compile MiniMaxForCausalLM"):
        build_engine(hf_tiny, RolloutConfig(engine="hf", cuda_graphs=True))
