"""Tiny hybrid MiniMax models shared by the rollout tests (CPU, fp32)."""
import pytest
import torch
from transformers import MiniMaxConfig, MiniMaxForCausalLM

LT, FA = "linear_attention", "full_attention"


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a shared 2-core box OpenMP
    spinning under contention made these tests ~40x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides) -> MiniMaxConfig:
    """4 layers, lightning first (the layout that trips transformers' padded decode), 2 softmax."""
    kw = dict(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, block_size=16, layer_types=[LT, FA, LT, FA],
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    kw.update(overrides)
    return MiniMaxConfig(**kw)


def sharpen_(model: torch.nn.Module, scale: float = 8.0) -> None:
    """Scale the LM head so next-token distributions are peaked (random init is near uniform,
    which makes greedy ties and sampling tests uninformative)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)


@pytest.fixture(scope="session")
def tiny_hybrid_d64():
    """Our HybridForCausalLM in the tiny layout at head dim 64 (sizes fla's GPU kernels take),
    sharpened, fp32 on the CPU."""
    from posttrain.models.hybrid import HybridForCausalLM

    torch.manual_seed(0)
    model = HybridForCausalLM(tiny_config(head_dim=64)).eval()
    sharpen_(model)
    return model


@pytest.fixture(scope="session")
def hf_tiny() -> MiniMaxForCausalLM:
    torch.manual_seed(0)
    model = MiniMaxForCausalLM(tiny_config()).eval()
    sharpen_(model)
    return model


def recompute_logprobs(model, prompt: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """Reference: one full forward over prompt + tokens, fp32 log softmax(logits / T) at the tokens.
    Returns [len(tokens)]."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [P + N, V]
    t = temperature if temperature > 0 else 1.0
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1] / t, dim=-1)  # predicts tokens[0..N-1]
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.fixture(name="recompute_logprobs", scope="session")
def _recompute_logprobs_fixture():
    return recompute_logprobs


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    """Mixed lengths (one crosses the lightning block size of 16), one prompt repeated."""
    return [[1, 5, 9, 13, 17, 21, 25], [1, 7], [1, 3, 4, 8, 40, 50, 60, 33, 34, 35, 36, 37, 38, 39, 41, 42, 43, 44], [1, 7]]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, hf_tiny) -> str:
    """The sharpened tiny model saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny_minimax")
    hf_tiny.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_engines(tiny_dir):
    """{engine name: (engine, the model it runs)} over the same saved weights."""
    from transformers import AutoModelForCausalLM

    from posttrain.rollout.hf_engine import HFEngine

    engines = {}
    hf_model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    engines["hf"] = (HFEngine(hf_model), hf_model)
    try:
        from posttrain.models.hybrid import HybridForCausalLM
        from posttrain.rollout.native import NativeEngine
    except ImportError:
        return engines
    native_model = HybridForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    engines["native"] = (NativeEngine(native_model, num_slots=3), native_model)
    return engines
