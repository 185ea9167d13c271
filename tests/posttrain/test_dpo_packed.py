"""Long-context DPO: pairs packed into rows with cu_seqlens give the right-padded batch's
sequence log-probs, DPO loss, metrics and parameter gradients (fp32); reference log-probs
go through the same machinery; a document that does not fit is an error naming the pair.

The padded path itself is checked against per-sequence forwards in test_dpo_objective.py.
Document lengths are chosen so that documents straddle the lightning kernel's chunk
boundaries (chunk 64, posttrain.models.hybrid) inside their packed row.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from posttrain.config import ModelConfig
from posttrain.data import DataError, Example, load_records
from posttrain.data.collate import IGNORE_INDEX
from posttrain.models import build_model, set_gradient_checkpointing
from posttrain.objectives import (
    DPOObjective, PackedPreferenceBatch, SigmoidDPOLoss, StepCounts, reference_logprobs, segment_sums,
    sequence_logprobs, target_logprobs,
)
from posttrain.data import token_ids
from posttrain.stages.dpo_pairs import Pair, collate_pairs, compute_reference, encode_pairs, pack_pairs

torch.set_num_threads(1)
LIGHTNING_CHUNK = 64  # HybridModel.forward's default chunk_size
# (prompt, chosen response, rejected response) lengths in tokens: documents of 19 to 131 tokens
LENGTHS = [(12, 40, 7), (30, 101, 55), (5, 14, 60), (20, 3, 90), (41, 25, 25)]
OBJECTIVE = DPOObjective(SigmoidDPOLoss(beta=0.3, label_smoothing=0.1, rpo_alpha=0.5), chunk_size=48)


def make_model(tok, aux_coef: float = 0.0):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny-hybrid", overrides={"router_aux_loss_coef": aux_coef}),
                       **token_ids(tok)).train()


def make_pairs(tok, seed: int = 0) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i, (n_prompt, n_chosen, n_rejected) in enumerate(LENGTHS):
        prompt = [tok.bos_token_id] + torch.randint(10, 60, (n_prompt - 1,), generator=g).tolist()
        sides = []
        for n in (n_chosen, n_rejected):
            resp = torch.randint(10, 60, (n - 1,), generator=g).tolist() + [tok.eos_token_id]
            sides.append(Example(prompt + resp, [0] * len(prompt) + [1] * len(resp)))
        pairs.append(Pair(*sides, ref_chosen=-60.0 - 7 * i, ref_rejected=-75.0 + 5 * i))
    return pairs


def straddling_documents(batch: PackedPreferenceBatch) -> int:
    """Documents that start inside a lightning chunk of their row and end in a later one."""
    n = 0
    for r in range(batch.num_rows):
        cu = batch.row(r).cu_seqlens.tolist()
        n += sum(1 for lo, hi in zip(cu, cu[1:]) if lo % LIGHTNING_CHUNK and lo // LIGHTNING_CHUNK != (hi - 1) // LIGHTNING_CHUNK)
    return n


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def loss_metrics_grads(model, batch, num_pairs: int):
    model.zero_grad(set_to_none=True)
    loss, metrics = OBJECTIVE(model, batch, StepCounts(sequences=num_pairs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: float(v) for k, v in metrics.items()}, grads


def test_pack_pairs_layout(tok):
    pairs = make_pairs(tok)
    batch = pack_pairs(pairs, 160)
    docs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    B = len(pairs)
    assert sorted(batch.slot_doc.tolist()) == list(range(2 * B))
    assert batch.input_ids.shape == (1, sum(len(d) for d in docs))  # no padding
    assert 1 < batch.num_rows < 2 * B  # documents share rows
    cu = batch.cu_seqlens.tolist()
    assert set(batch.row_bounds.tolist()) <= set(cu)  # rows end on document boundaries
    for r in range(batch.num_rows):
        assert batch.row(r).input_ids.shape[1] <= 160
    for k, d in enumerate(docs):  # slot k's document, found through slot_doc, is that document
        n = int(batch.slot_doc[k])
        lo, hi = cu[n], cu[n + 1]
        assert batch.input_ids[0, lo:hi].tolist() == d.input_ids
        assert batch.position_ids[0, lo:hi].tolist() == list(range(len(d)))
        # the next document's first token is never a target of this one
        assert batch.targets[0, hi - 1] == IGNORE_INDEX
        assert int((batch.targets[0, lo:hi] != IGNORE_INDEX).sum()) == sum(d.loss_mask[1:])
    assert batch.ref_logps.tolist() == [p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs]
    assert straddling_documents(batch) >= 2


@pytest.mark.parametrize("max_seq_len,aux_coef,checkpointing", [(160, 0.0, False), (2048, 0.001, False),
                                                                (160, 0.0, True)])
def test_packed_loss_metrics_and_gradients_equal_padded(tok, max_seq_len, aux_coef, checkpointing):
    """Several rows (router loss off: it is a product of batch means, so it depends on how
    tokens are grouped into forwards), one row holding every document with the router loss
    on (same tokens as the padded batch, so the same aux loss), and several rows with
    gradient checkpointing (the long-context memory setting)."""
    model = make_model(tok, aux_coef)
    set_gradient_checkpointing(model, checkpointing)
    pairs = make_pairs(tok)
    packed = pack_pairs(pairs, max_seq_len)
    assert (packed.num_rows == 1) == (max_seq_len == 2048) and straddling_documents(packed) >= 2
    loss_p, m_p, g_p = loss_metrics_grads(model, packed, num_pairs=8)
    loss_r, m_r, g_r = loss_metrics_grads(model, collate_pairs(pairs, tok.pad_token_id), num_pairs=8)
    assert abs(loss_p - loss_r) / abs(loss_r) <= 1e-5
    assert m_p.keys() == m_r.keys()
    for k in m_r:
        assert m_p[k] == pytest.approx(m_r[k], rel=1e-5, abs=1e-7), k
    assert g_p.keys() == g_r.keys()
    worst = max(rel_err(g_p[n], g_r[n]) for n in g_r)
    assert worst <= 1e-5, f"gradient differs by up to {worst:.2e} (relative)"

    # the comparison can fail: a wrong slot mapping is another loss, and so are the same rows
    # with state and attention leaking across documents (per-document sums of a plain forward)
    swapped = dataclasses.replace(packed, slot_doc=packed.slot_doc.roll(1))
    assert abs(loss_metrics_grads(model, swapped, num_pairs=8)[0] - loss_r) / abs(loss_r) > 1e-3
    with torch.no_grad():
        row = packed.row(0)
        isolated = sequence_logprobs(model, row)[0]
        logp, _, _ = target_logprobs(model, dataclasses.replace(row, cu_seqlens=None, max_seqlen=None), chunk_size=1024)
        leaked = segment_sums(logp[0], row.cu_seqlens)
    assert rel_err(leaked[1:], isolated[1:]) > 1e-3 and rel_err(leaked[:1], isolated[:1]) <= 1e-5


def test_reference_logprobs_packed_equal_padded(tok):
    model = make_model(tok)
    pairs = make_pairs(tok, seed=1)

    class RankZero:  # LearnerGroup.call_rank0 on a local model
        @staticmethod
        def call_rank0(fn, *args):
            return fn(model, *args)

    padded = compute_reference(RankZero, pairs, tok.pad_token_id, micro_size=2, chunk_size=48)
    packed = compute_reference(RankZero, pairs, tok.pad_token_id, micro_size=2, chunk_size=48, pack_len=160)
    assert len(packed) == len(padded) == len(pairs)
    a, b = torch.tensor(packed), torch.tensor(padded)
    assert rel_err(a, b) <= 1e-5
    assert (a[:, 0] != a[:, 1]).all()  # chosen and rejected were not swapped into agreement
    # and the flat order of one packed batch is chosen 0..B-1, then rejected 0..B-1
    flat = reference_logprobs(model, [pack_pairs(pairs, 160)], chunk_size=48)
    assert rel_err(torch.tensor(flat), torch.tensor([c for c, _ in padded] + [r for _, r in padded])) <= 1e-5


def test_a_document_longer_than_max_seq_len_is_an_error_naming_the_pair(tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
            {"prompt": "2+2=", "chosen": "4", "rejected": "no idea, " * 20}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(path, "preference").records
    with pytest.raises(DataError, match=r"pairs\.jsonl pair 2: prompt \+ rejected response is \d+ tokens, "
                                        r"longer than data\.max_seq_len=64"):
        encode_pairs(records, tok, 64, path, truncate=False)
    cut = encode_pairs(records, tok, 64, path)  # the padded path keeps truncating
    assert len(cut[1].rejected) == 64 and cut[1].rejected.truncated
    whole = encode_pairs(records, tok, 512, path, truncate=False)
    assert not whole[1].rejected.truncated and len(whole[1].rejected) > 64

    pairs = make_pairs(tok)
    with pytest.raises(ValueError, match=r"pair 1 of the micro-batch: its chosen document has 131 tokens"):
        pack_pairs(pairs, 128)


# ------------------------------------------------------------------------ stage on Ray
STAGE = {
    "name": "t", "seed": 0, "model": {"preset": "tiny-hybrid"}, "cluster": {"num_cpus": 2},
    "stages": [{
        "name": "dpo", "kind": "dpo", "steps": 3,
        "data": {"format": "preference", "max_seq_len": 384, "pack": True},
        "loss": {"kind": "sigmoid", "beta": 0.5},
        "optim": {"lr": 1.0e-3},
        "schedule": {"kind": "constant"},
        "batch": {"global_size": 4, "micro_size": 2},
        "eval": {"every": 0},
    }],
}


def write_pairs(path, n: int, seed: int) -> None:
    """Needle-style prompts of 60-330 characters; the chosen answer is the value, the rejected
    one a refusal: a preference a tiny model picks up in a few steps."""
    g = torch.Generator().manual_seed(seed)
    words = ["river", "stone", "cloud", "lamp", "field", "quiet", "north", "amber"]
    rows = []
    for _ in range(n):
        value = int(torch.randint(0, 10, (1,), generator=g))
        filler = " ".join(words[int(i)] for i in torch.randint(0, len(words), (int(torch.randint(8, 50, (1,), generator=g)),), generator=g))
        rows.append({"prompt": f"key ab = {value}. {filler}. what is ab?", "chosen": str(value),
                     "rejected": "i do not know the value of ab"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_packed_dpo_stage_runs_and_learns_the_preference(tmp_path, ray_local):
    import yaml

    from posttrain.config import load_recipe
    from posttrain.pipeline import run_recipe

    write_pairs(tmp_path / "train.jsonl", 24, seed=0)
    write_pairs(tmp_path / "eval.jsonl", 8, seed=1)
    raw = json.loads(json.dumps(STAGE))
    raw["run_dir"] = str(tmp_path / "run")
    raw["stages"][0]["data"].update(train=str(tmp_path / "train.jsonl"), eval=str(tmp_path / "eval.jsonl"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    run_recipe(load_recipe(str(tmp_path / "r.yaml")))

    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and before["pref_accuracy"] == 0.5  # policy == reference: ties
    assert after["pref_accuracy"] >= 0.75 and after["reward_margin"] > before["reward_margin"]
    # the paired change of preference accuracy: the same 8 held-out pairs at step 0 and at the end
    gain = after["pref_gain"]
    assert "pref_gain" not in before and gain["n"] == 8
    assert (gain["start"], gain["end"]) == (pytest.approx(before["pref_accuracy"]), pytest.approx(after["pref_accuracy"]))
    assert gain["delta"] == pytest.approx(after["pref_accuracy"] - before["pref_accuracy"])
    assert gain["improved"] >= 6 and gain["regressed"] == 0  # from ties (0.5) to ranked right (1)
    scores = json.loads((tmp_path / "run" / "stages" / "00-dpo" / "eval" / "dpo-pref-step0.json").read_text())
    assert scores["hits"] == [0.5] * 8
    ref = json.loads((tmp_path / "run" / "stages" / "00-dpo" / "pairs" / "ref_logps.json").read_text())
    assert len(ref["train"]) == 24 and len(ref["eval"]) == 8
