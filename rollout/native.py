"""The native engine: continuous-batching decoding of our hybrid lightning-attention model.

S decode slots share one `DecodeCache` (posttrain.models.decode): each lightning layer keeps a
fixed fp32 state per slot, each softmax layer a KV cache. Requests are the (prompt, sample)
pairs in prompt-major order; whenever a sample finishes, its slot is refilled with the next
waiting request, so short completions never leave a slot idle while work remains.

A prompt is prefilled once (newly needed prompts are prefilled together in one packed forward)
and its state is inserted into every slot that samples it, so n samples cost one prefill.
The LM head logits come back fp32; log-probs follow posttrain.rollout.types (log softmax of
logits / T at the sampled token, no top-k/top-p renormalisation). With `params.seed` each request
draws from its own generator (sampling.request_generator), so results do not depend on the
number of slots or on which other requests share the batch.

Finish order per token: a stop id ends the sample ("stop"); otherwise a completed M1 run of
`early_stop_run` tokens with probability > `early_stop_prob` ends it ("truncated"); otherwise
reaching max_new_tokens (or the slot's max_len) ends it ("length"). The hf engine applies the
same order, so both engines agree token for token.
"""
from __future__ import annotations

import math
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from posttrain.models.decode import DecodeCache, SlotState, decode_step, decode_step_static, prefill_many
from posttrain.models.hybrid import HybridForCausalLM
from posttrain.rollout.sampling import request_generator, sample_tokens
from posttrain.rollout.types import Completion, FinishReason, SamplingParams
from posttrain.rollout.weights import load_named_tensors


@dataclass
class _Sample:
    """Progress of one request while it occupies a slot."""

    prompt_index: int
    sample_index: int
    generator: Optional[torch.Generator]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    streak: int = 0  # consecutive tokens with probability > early_stop_prob

    def append(self, token: int, logprob: float, params: SamplingParams, threshold: float, room: int) -> Optional[FinishReason]:
        """Record a sampled token; return why the sample ends now, or None to continue.

        room: tokens the slot can still hold after this one (KV capacity)."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        self.streak = self.streak + 1 if logprob > threshold else 0
        if token in params.stop_token_ids:
            return "stop"
        if params.early_stop_run is not None and self.streak >= params.early_stop_run:
            return "truncated"
        if len(self.tokens) >= params.max_new_tokens or room <= 0:
            return "length"
        return None

    def done(self, reason: FinishReason) -> Completion:
        return Completion(self.prompt_index, self.sample_index, self.tokens, self.logprobs, reason)


def _on_cuda(model: HybridForCausalLM) -> bool:
    return model.device.type == "cuda"


class NativeEngine:
    """RolloutEngine for HybridForCausalLM with `num_slots` decode slots (the max batch).

    max_len: KV capacity per slot (prompt + completion); None sizes it per generate call as
    longest prompt + max_new_tokens. A sample that fills its slot ends with "length".
    """

    def __init__(self, model: HybridForCausalLM, num_slots: int = 32, max_len: Optional[int] = None,
                 cuda_graphs: Optional[bool] = False) -> None:
        if num_slots < 1:
            raise ValueError(f"NativeEngine: num_slots must be >= 1, got {num_slots}")
        self.model = model.eval()
        self.num_slots = num_slots
        self.max_len = max_len
        # on a CUDA device: decode steps replayed as one CUDA graph. True: a failed capture raises;
        # None: it warns and this engine decodes eagerly from then on; False: never captured
        self.cuda_graphs = cuda_graphs
        self.policy_version = 0
        self.graph_captures = 0  # generate calls that captured a decode graph

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_named_tensors(self.model, named_tensors)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """n completions per prompt, prompt-major (see RolloutEngine)."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("native engine: empty prompt (every prompt needs at least one token)")
        max_len = self.max_len or max(len(p) for p in prompts) + params.max_new_tokens
        too_long = [i for i, p in enumerate(prompts) if len(p) >= max_len]
        if too_long:
            raise ValueError(f"native engine: prompts {too_long[:5]} have >= max_len={max_len} tokens")
        graphs = self.cuda_graphs is not False and _on_cuda(self.model)
        run = _Run(self.model, self.num_slots, max_len, prompts, params, cuda_graph=graphs,
                   graph_required=self.cuda_graphs is True)
        completions = run.run()
        self.graph_captures += run.captured
        if run.capture_error is not None:
            warnings.warn(f"native engine: CUDA-graph capture failed ({run.capture_error}); decoding eagerly from "
                          f"now on (rollout.cuda_graphs: true makes this an error)", RuntimeWarning, stacklevel=2)
            self.cuda_graphs = False
        return completions


def warm_up_static(model: HybridForCausalLM, cache: DecodeCache, steps: int) -> None:
    """Run decode_step_static `steps` times with no slot active and leave what the slots hold
    as it was: lengths do not move, each softmax layer writes only the position the next real
    step overwrites, and the lightning states are saved before and put back after."""
    idle = torch.zeros(cache.num_slots, dtype=torch.bool, device=cache.lengths.device)
    tokens = torch.zeros(cache.num_slots, dtype=torch.long, device=cache.lengths.device)
    saved = {i: state.clone() for i, state in cache.linear.items()}
    try:
        for _ in range(steps):
            decode_step_static(model, tokens, cache, idle)
    finally:
        for i, state in saved.items():
            cache.linear[i].copy_(state)


class GraphedDecode:
    """`decode_step_static` on one cache, captured once as a CUDA graph and replayed per step:
    one launch for the whole step instead of a few hundred small kernels (small-hybrid's eager
    decode step is bound by their launches on an H200: ~35 ms, docs/benchmarks.md).

    Can be built mid-run, on a cache whose slots hold live sequences: the warm-up steps before
    the capture (kernel autotuning and library allocations must happen outside it) leave the
    slots as they were (warm_up_static).
    Call like decode_step; the returned logits `[S, V]` are the graph's output buffer,
    overwritten by the next call."""

    def __init__(self, model: HybridForCausalLM, cache: DecodeCache, warmup: int = 2) -> None:
        device = cache.lengths.device
        self.tokens = torch.zeros(cache.num_slots, dtype=torch.long, device=device)
        self.active = torch.zeros(cache.num_slots, dtype=torch.bool, device=device)  # warm-up: no length moves
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            warm_up_static(model, cache, warmup)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: the cache is untouched
            self.logits = decode_step_static(model, self.tokens, cache, self.active)

    def __call__(self, model: HybridForCausalLM, tokens: torch.Tensor, cache: DecodeCache,
                 active: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.active.copy_(active)
        self.graph.replay()
        return self.logits


# Eager decode steps a generate call runs before it captures its graph. Capturing at the start of
# every call added ~0.14 s to a GRPO step of 2-token answers on an H200 (docs/gpu.md, session 9),
# a few eager steps' worth; generations shorter than this never pay for a capture.
CAPTURE_AFTER_STEPS = 8


class _Run:
    """State of one generate call: waiting requests, prefilled prompts, occupied slots."""

    def __init__(self, model: HybridForCausalLM, num_slots: int, max_len: int,
                 prompts: Sequence[Sequence[int]], params: SamplingParams, cuda_graph: bool = False,
                 graph_required: bool = False) -> None:
        self.model, self.prompts, self.params = model, prompts, params
        self.device = model.device
        self.cache = DecodeCache(model, num_slots=num_slots, max_len=max_len)
        self.cuda_graph = cuda_graph  # switch to a GraphedDecode after CAPTURE_AFTER_STEPS eager steps
        self.step = decode_step
        self.graph_required = graph_required  # else a failed capture is kept in capture_error, and the run goes on eagerly
        self.steps, self.captured, self.capture_error = 0, False, None
        self.waiting = deque((p, s) for p in range(len(prompts)) for s in range(params.n))
        self.prefilled: dict[int, tuple[torch.Tensor, SlotState]] = {}  # prompt -> (logits [V], state)
        self.uses_left = {p: params.n for p in range(len(prompts))}
        self.slots: list[Optional[_Sample]] = [None] * num_slots
        self.next_tokens = torch.zeros(num_slots, dtype=torch.long, device=self.device)  # [S]
        self.finished: dict[tuple[int, int], Completion] = {}
        self.threshold = math.log(params.early_stop_prob)

    def run(self) -> list[Completion]:
        self._fill_free_slots()
        while any(s is not None for s in self.slots):
            rows = [i for i, s in enumerate(self.slots) if s is not None]
            active = torch.zeros(len(self.slots), dtype=torch.bool)
            active[rows] = True
            if self.cuda_graph and self.steps == CAPTURE_AFTER_STEPS:
                self._capture()
            self.steps += 1
            logits = self.step(self.model, self.next_tokens, self.cache, active.to(self.device))  # [S, V] fp32
            self._sample_into(rows, logits if len(rows) == len(self.slots) else logits[rows])
            self._fill_free_slots()
        return [self.finished[(p, s)] for p in range(len(self.prompts)) for s in range(self.params.n)]

    def _capture(self) -> None:
        """Switch this run's decode step to a captured graph (or, if the capture fails and
        graphs are not required, record why and stay eager)."""
        try:
            self.step = GraphedDecode(self.model, self.cache)
            self.captured = True
        except RuntimeError as err:
            if self.graph_required:
                raise
            self.capture_error = str(err).splitlines()[0] if str(err) else type(err).__name__
            self.cuda_graph = False

    def _new_sample(self, prompt: int, sample: int) -> _Sample:
        seed = self.params.seed
        gen = request_generator(seed, prompt, sample) if seed is not None else None
        return _Sample(prompt, sample, gen)

    def _fill_free_slots(self) -> None:
        """Put waiting requests into free slots and sample their first token from the prefill logits.

        Loops because a request can finish on its first token and free its slot again."""
        while self.waiting and any(s is None for s in self.slots):
            free = [i for i, s in enumerate(self.slots) if s is None][: len(self.waiting)]
            keys = [self.waiting.popleft() for _ in free]
            self._prefill({p for p, _ in keys})
            first_logits = []
            for slot, (p, s) in zip(free, keys):
                logits, state = self.prefilled[p]
                self.cache.insert(slot, state)
                self.slots[slot] = self._new_sample(p, s)
                first_logits.append(logits)
                self.uses_left[p] -= 1
                if self.uses_left[p] == 0:
                    del self.prefilled[p]  # last sample of this prompt placed: free its KV copy
            self._sample_into(free, torch.stack(first_logits))

    def _prefill(self, prompt_indices: set[int]) -> None:
        """Prefill (in one packed forward) the prompts that are not prefilled yet."""
        todo = sorted(p for p in prompt_indices if p not in self.prefilled)
        if not todo:
            return
        logits, states = prefill_many(self.model, [list(self.prompts[p]) for p in todo])
        for row, p in enumerate(todo):
            self.prefilled[p] = (logits[row], states[row])

    def _sample_into(self, slots: list[int], logits: torch.Tensor) -> None:
        """Sample one token for each of `slots` from logits [len(slots), V]; retire finished samples."""
        samples = [self.slots[i] for i in slots]
        gens = [s.generator for s in samples] if self.params.seed is not None else None
        ids, lps = sample_tokens(logits, self.params, gens)
        # one write for all slots (a finished slot's entry is never read: it is inactive)
        self.next_tokens[torch.tensor(slots, device=self.device)] = ids.to(self.device)
        lengths = self.cache.lengths.tolist()
        for slot, sample, tok, lp in zip(slots, samples, ids.tolist(), lps.tolist()):
            # The token is not in the cache yet; feeding it needs one more position.
            room = self.cache.max_len - lengths[slot] - 1
            reason = sample.append(tok, lp, self.params, self.threshold, room)
            if reason is not None:
                self.finished[(sample.prompt_index, sample.sample_index)] = sample.done(reason)
                self.slots[slot] = None
                self.cache.release(slot)
