"""A special token inside a sequence must not blow gradients up.

RL samples from the whole vocabulary, so a completion can contain the pad token. With an
all-zero pad embedding (nn.Embedding's padding_idx) the first RMSNorm sees a zero vector,
whose Jacobian is 1/sqrt(eps); stacked over layers the gradient became NaN at once.
"""
import torch

from posttrain.config import ModelConfig
from posttrain.data import build_tokenizer
from posttrain.models import build_model, forward_hidden, token_logprobs
from posttrain.data import token_ids


def test_pad_token_inside_a_sequence_keeps_gradients_finite():
    torch.set_num_threads(1)
    tok = build_tokenizer("char")
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-hybrid"), **token_ids(tok)).train()
    pad = tok.pad_token_id
    ids = torch.tensor([[tok.bos_token_id, 20, 21, pad, 22, 23, 24, 25]])
    targets = torch.tensor([[-100, 21, pad, 22, 23, 24, 25, -100]])
    assert model.get_input_embeddings().weight[pad].abs().sum() > 0
    hidden, _ = forward_hidden(model, ids, attention_mask=torch.ones_like(ids))
    (-token_logprobs(model, hidden, targets).sum()).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert torch.isfinite(norm) and norm < 1e3
