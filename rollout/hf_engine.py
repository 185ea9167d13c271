"""The reference engine: transformers `generate` for any Hugging Face causal LM.

Batched over left-padded rows; for MiniMax models only rows of equal prompt length (see
`_chunks` for why not padded). `output_logits=True` returns the raw (unprocessed) logits of every
step; the engine's log-probs are log_softmax(logits.float() / T) at the sampled ids (see
posttrain.rollout.types for why there is no top-k/top-p renormalisation). Slow but simple: it is
the yardstick the native and vLLM engines are tested against.

Decoding on CUDA (`cuda_graphs`, the rollout config's setting): for models transformers can compile
whole (`_can_compile_fullgraph`: Qwen2, Llama, ...; not MiniMax) the KV cache is a `StaticCache`
whose length is bucketed (`static_cache_len`), so every call of one batch size decodes through
one compiled step: torch.compile in "reduce-overhead" mode, replayed as a CUDA graph. Eager
transformers decoding of a ~200M model is bound by kernel launches and Python (issue 16: 2.5 s
of a 2.8-s qwen2 GRPO step on an H200). A cache length that followed each call's prompt width
would compile again for every new width; the buckets keep it to a few shapes.

Seeding: with `params.seed` set, generation runs inside `torch.random.fork_rng` seeded with it,
so the same seed and the same prompts give the same completions (unlike `native`, the samples
do depend on batch composition, because transformers draws from one shared RNG).
"""
from __future__ import annotations

import re
import warnings
from typing import Iterable, Optional, Sequence

import torch
from transformers import GenerationConfig, PreTrainedModel, StaticCache
from transformers.generation.configuration_utils import CompileConfig

from posttrain.rollout.sampling import early_stop_length
from posttrain.rollout.types import Completion, FinishReason, SamplingParams
from posttrain.rollout.weights import load_named_tensors


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists. Returns (input_ids [B, T], attention_mask [B, T]) with T the longest."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("hf engine: empty prompt (every prompt needs at least one token)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def finish_completion(
    prompt_index: int,
    sample_index: int,
    tokens: list[int],
    logprobs: list[float],
    params: SamplingParams,
) -> Completion:
    """Cut a raw generated row at its first stop token (kept) and apply early truncation."""
    stop = set(params.stop_token_ids)
    reason: FinishReason = "length"
    for i, tok in enumerate(tokens):
        if tok in stop:
            tokens, logprobs, reason = tokens[: i + 1], logprobs[: i + 1], "stop"
            break
    keep = early_stop_length(logprobs, params.early_stop_run, params.early_stop_prob)
    # A run completed exactly on the stop token counts as a normal stop.
    if keep is not None and not (reason == "stop" and keep == len(tokens)):
        tokens, logprobs, reason = tokens[:keep], logprobs[:keep], "truncated"
    return Completion(prompt_index, sample_index, tokens, logprobs, reason)


MIN_STATIC_CACHE_LEN = 256
# static caches kept, one per (rows, length): a training shape and an eval shape. Each holds K and V
# of every layer for rows x length positions, on the GPU between calls (in colocated mode also
# while the learner trains: rollout.cuda_graphs false frees it after each call)
MAX_CACHES = 2


def static_cache_len(width: int, max_new_tokens: int, fixed: Optional[int] = None) -> int:
    """KV length of the static cache for a call whose longest prompt has `width` tokens: `fixed`
    (the rollout config's max_len) when set and long enough, else the next power of two >=
    width + max_new_tokens, at least MIN_STATIC_CACHE_LEN (a call that outgrows max_len gets a
    bucket of its own, as the dynamic cache it replaces would have grown)."""
    need = width + max_new_tokens
    if fixed is not None and fixed >= need:
        return fixed
    return max(MIN_STATIC_CACHE_LEN, 1 << (need - 1).bit_length())


class HFEngine:
    """RolloutEngine over a transformers causal LM (already on its device, eval mode).

    cuda_graphs: False: transformers' default dynamic cache, eager. None: a static cache and the
    compiled decode step where they apply (CUDA, a model transformers compiles whole); a compile
    that fails warns and this engine decodes eagerly from then on, the failed call redone from
    the same RNG state. True: as None, but a failure raises, and so does a model that cannot be
    compiled. max_len: the static cache's length (None: bucketed per call, `static_cache_len`).
    """

    def __init__(self, model: PreTrainedModel, max_batch: Optional[int] = None,
                 cuda_graphs: Optional[bool] = False, max_len: Optional[int] = None) -> None:
        self.model = model.eval()
        self.max_batch = max_batch  # None: all prompts x n in one generate call
        self.policy_version = 0
        pad = model.config.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        compilable = bool(getattr(model, "_can_compile_fullgraph", False))
        if cuda_graphs is True and not compilable:
            raise ValueError(f"rollout.cuda_graphs: true, but transformers cannot compile {type(model).__name__} "
                             f"whole for the hf engine's decode step (set it to null or false)")
        self.cuda_graphs = cuda_graphs
        self.max_len = max_len
        # static cache + compiled decode step; decided here, turned off by a failed compile (None)
        self.static_decode = cuda_graphs is not False and compilable and _device(model).type == "cuda"
        # reduce-overhead: CUDA graphs; fixed shapes, so a new (rows, cache length) compiles anew.
        # None: the static cache without compiling (what the CPU tests check of the cache alone)
        self.compile_config: Optional[CompileConfig] = CompileConfig(mode="reduce-overhead", dynamic=False)
        self.decode_shapes: set[tuple[int, int]] = set()  # (rows, cache length) decoded statically
        self._caches: dict[tuple[int, int], StaticCache] = {}

    def _generation_config(self, params: SamplingParams) -> GenerationConfig:
        # Every knob is explicit so the model's own generation_config.json (repetition penalty,
        # default top_k=50, ...) can never change what is sampled.
        sample = not params.greedy
        return GenerationConfig(
            do_sample=sample,
            temperature=params.temperature if sample else None,
            # 0, not None: None lets transformers apply its default top_k=50 (found by
            # benchmarks/vs_trl.py: a 107-token model then never sampled its eos)
            top_k=(params.top_k if params.top_k > 0 else 0) if sample else None,
            top_p=params.top_p if sample and params.top_p < 1.0 else None,
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=0,
            # [] (not None): None would fall back to the model's own eos and stop/pad rows early.
            eos_token_id=list(params.stop_token_ids),
            pad_token_id=self.pad_id,
            repetition_penalty=None,
            num_beams=1,
            output_logits=True,
            return_dict_in_generate=True,
            use_cache=True,
        )

    def _static_cache(self, rows: int, length: int) -> StaticCache:
        """The static cache for (rows, length), emptied. The same object (the same tensors, which
        a CUDA graph reads in place) whenever the shape comes back; the last MAX_CACHES kept."""
        cache = self._caches.pop((rows, length), None)
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=length)
        else:
            cache.reset()
        self._caches[(rows, length)] = cache  # most recent last
        while len(self._caches) > MAX_CACHES:
            self._caches.pop(next(iter(self._caches)))
        return cache

    def _generate_static(self, input_ids: torch.Tensor, mask: torch.Tensor, config: GenerationConfig, length: int):
        if self.compile_config is None:  # the static cache alone, eager
            config.disable_compile = True
        else:
            config.compile_config = self.compile_config
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                  past_key_values=self._static_cache(input_ids.shape[0], length))
        self.decode_shapes.add((input_ids.shape[0], length))
        return out

    @torch.no_grad()
    def _generate_rows(self, rows: Sequence[Sequence[int]], params: SamplingParams) -> list[tuple[list[int], list[float]]]:
        """Raw generated tokens and their log-probs for each row (before stop/truncation cuts)."""
        device = _device(self.model)
        input_ids, mask = left_pad(rows, self.pad_id, device)
        config = self._generation_config(params)
        out = None
        if self.static_decode:
            length = static_cache_len(input_ids.shape[1], params.max_new_tokens, self.max_len)
            rng = _rng_state(device)
            try:
                out = self._generate_static(input_ids, mask, config, length)
            except Exception as error:  # a compile or graph failure: eager from now on (None)
                if self.cuda_graphs is True:
                    raise
                warnings.warn(f"hf engine: the compiled static-cache decode failed ({type(error).__name__}: {error}); "
                              f"decoding eagerly from now on (rollout.cuda_graphs: true makes this an error)",
                              RuntimeWarning, stacklevel=2)
                self.static_decode = False
                self._caches.clear()
                _set_rng_state(device, rng)
                config = self._generation_config(params)
        if out is None:
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
        new = out.sequences[:, input_ids.shape[1]:]  # [B, steps]
        t = params.temperature if params.temperature > 0 else 1.0
        logits = torch.stack(out.logits, dim=1).float()  # [B, steps, V]
        lp = torch.log_softmax(logits / t, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)  # [B, steps]
        return [(new[b].tolist(), lp[b].tolist()) for b in range(new.shape[0])]

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Completion]:
        """n completions per prompt, prompt-major (see RolloutEngine)."""
        keys = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        raw: dict[tuple[int, int], tuple[list[int], list[float]]] = {}
        device = _device(self.model)
        # Fork (and seed) the RNG of the device that samples, leaving the caller's RNG untouched.
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for chunk in self._chunks(prompts, keys):
                rows = self._generate_rows([prompts[p] for p, _ in chunk], params)
                raw.update(zip(chunk, rows))
        return [finish_completion(p, s, *raw[(p, s)], params) for p, s in keys]

    def _chunks(self, prompts: Sequence[Sequence[int]], keys: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """Rows of one generate call each: up to max_batch rows, left-padded to the longest prompt;
        for MiniMax models only rows whose prompts have the same length, so no row is ever padded.

        Why: with transformers 5.19, MiniMax models whose layer 0 is a lightning layer build the
        decode-time softmax-attention mask from layer 0's (empty) KV length, so left-padding keys
        leak into later decode steps (log-prob errors ~1e-3 against a full forward). Equal-length
        batches sidestep it exactly; the n samples of one prompt always batch together. Other
        models pad correctly, and one call per prompt length would decode the whole budget once
        per distinct length (arithmetic prompts: ~5 calls instead of 1, 2x TRL's step time).
        """
        by_len: dict[int, list[tuple[int, int]]] = {}
        exact = getattr(self.model.config, "model_type", None) == "minimax"
        for key in keys:
            by_len.setdefault(len(prompts[key[0]]) if exact else 0, []).append(key)
        size = self.max_batch or len(keys)
        return [group[i:i + size] for group in by_len.values() for i in range(0, len(group), size)]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """In-memory names, or for MiniMax models the checkpoint names our learner uses."""
        resolve = None
        if getattr(self.model.config, "model_type", None) == "minimax":
            resolve = lambda name: minimax_checkpoint_view(self.model, name)  # noqa: E731
        load_named_tensors(self.model, named_tensors, resolve)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _rng_state(device: torch.device) -> torch.Tensor:
    """The RNG state that sampling on `device` draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


_MINIMAX_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_MINIMAX_GATE = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight$")


def minimax_checkpoint_view(model: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    """The slice of transformers' MiniMaxForCausalLM that a checkpoint-layout name refers to.

    Checkpoints (and posttrain.models.HybridForCausalLM) name experts `block_sparse_moe.experts.
    {e}.w1/w2/w3` (gate/down/up); transformers 5 fuses them in memory as
    `mlp.experts.gate_up_proj[e] = cat(w1, w3)` `[E, 2I, H]` and `down_proj[e] = w2` `[E, H, I]`.
    Returns a view to copy into, or None when `name` is not such a name.
    """
    if match := _MINIMAX_GATE.match(name):
        return model.model.layers[int(match.group(1))].mlp.gate.weight
    if match := _MINIMAX_EXPERT.match(name):
        layer, expert, which = int(match.group(1)), int(match.group(2)), match.group(3)
        experts = model.model.layers[layer].mlp.experts
        inter = experts.down_proj.shape[-1]
        if which == "w2":
            return experts.down_proj[expert]
        fused = experts.gate_up_proj[expert]  # [2I, H]: gate rows then up rows
        return fused[:inter] if which == "w1" else fused[inter:]
    return None
