"""Placement through Ray's own resources, tested without GPUs: Ray accepts logical GPUs
(`ray.init(num_gpus=4)`) and gives actors GPU ids and CUDA_VISIBLE_DEVICES as it would on a GPU
node. Colocated: learner rank i and rollout worker i get the same GPU; split: disjoint GPUs, every
requested GPU used. A learner binds the first GPU it sees (what Ray assigned), never a device
picked by its rank. A two-node Ray cluster on this machine (a head and a second `ray start`
node) runs an rl stage whose learners span both nodes and gives the same weights as one node.

The probes run in subprocesses: each needs a Ray instance of its own (logical GPUs, or a
cluster started with `ray start`), while the test session keeps its local one.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_bind_device_takes_the_first_visible_gpu_not_the_rank(monkeypatch):
    """Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU (say physical GPU 3 for rank 1): the
    process must use cuda:0, the one it sees, whatever its rank."""
    from posttrain import learner

    chosen = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert learner.bind_device() == torch.device("cuda", 0) and chosen == [0]


PROBE = """
import json, sys
import ray
from posttrain.cluster import ClusterConfig, LearnerGroup, Placement, RolloutGroup
from posttrain.models import ModelConfig
from posttrain.rollout import RolloutConfig

if __name__ == "__main__":
    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    model = ModelConfig(preset="tiny-hybrid", overrides={"num_hidden_layers": 2})
    ids = dict(vocab_size=40, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    out = {}
    for mode in ("colocated", "split"):
        cluster = ClusterConfig(learners=2, rollout_workers=2, placement=mode, cpus_per_learner=0.5)
        p = Placement(cluster)
        lg = LearnerGroup(cluster, model, None, token_ids=ids, seed=0, placement=p)
        rg = RolloutGroup(cluster, RolloutConfig(engine="native", max_slots=4), model, None, token_ids=ids,
                          placement=p)
        out[mode] = {"learners": lg.placements(), "rollouts": rg.placements()}
        lg.shutdown(); rg.shutdown(); p.remove()
    errors = []
    for kw in (dict(learners=2, rollout_workers=3, placement="colocated"),
               dict(learners=3, rollout_workers=2, placement="split")):
        try:
            Placement(ClusterConfig(**kw))
        except ValueError as e:
            errors.append(str(e))
    out["errors"] = errors
    print("PROBE " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    script = tmp_path_factory.mktemp("probe") / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    line = next((x for x in out.stdout.splitlines() if x.startswith("PROBE ")), None)
    assert line, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(line[len("PROBE "):])


def _gpus(actors: list[dict]) -> list[list[str]]:
    for a in actors:  # Ray's assignment is what the process sees
        assert a["cuda_visible_devices"] == ",".join(a["gpu_ids"]), a
    return [a["gpu_ids"] for a in actors]


def test_colocated_puts_each_rollout_worker_on_its_learners_gpu(probe):
    learners, rollouts = _gpus(probe["colocated"]["learners"]), _gpus(probe["colocated"]["rollouts"])
    assert all(len(g) == 1 for g in learners) and len({g[0] for g in learners}) == 2  # one GPU per rank
    assert rollouts == learners  # worker i shares rank i's GPU


def test_split_gives_learners_and_rollout_workers_gpus_of_their_own(probe):
    learners, rollouts = _gpus(probe["split"]["learners"]), _gpus(probe["split"]["rollouts"])
    ids = [g[0] for g in learners + rollouts]
    assert all(len(g) == 1 for g in learners + rollouts)
    assert sorted(ids) == ["0", "1", "2", "3"]  # disjoint, and no requested GPU idle


def test_learners_bind_what_ray_assigned(probe):
    for mode in ("colocated", "split"):
        for a in probe[mode]["learners"]:
            assert a["device"] == "cpu" and a["local_rank"] is not None  # no CUDA here; ranks still distinct
        assert {a["local_rank"] for a in probe[mode]["learners"]} == {"0", "1"}


def test_placement_refuses_what_the_cluster_cannot_hold(probe):
    colocated, split = probe["errors"]
    assert "rollout_workers (3) must be <= cluster.learners (2)" in colocated
    assert "needs 5 GPUs" in split and "has 4" in split


def _meet(key: str, rank: int, delay: float) -> tuple[int, str]:
    from posttrain.rendezvous import rendezvous_store

    time.sleep(delay)
    store = rendezvous_store(key, "127.0.0.1", rank, 2, timeout_s=60)
    store.set(f"from-{rank}", str(rank))
    got = store.get(f"from-{1 - rank}").decode()
    # The store's server lives in rank 0's process (in a run, inside its process group): rank 0
    # waits until rank 1 has read, else rank 1 can find it closed (CI, session 10: "Failed to
    # recv, got 0 bytes" when rank 0 returned first)
    if rank == 0:
        store.get("read-1")
    else:
        store.set("read-1", "1")
    return store.port, got


def test_rendezvous_rank0_binds_its_own_port_and_the_others_find_it(ray_local):
    """Ranks meet without a port chosen in advance: rank 0 opens the store on a port the kernel
    picks at bind time and publishes it; a rank that starts first waits for it; the driver
    forgets the key when the group is done."""
    from ray.experimental import internal_kv

    from posttrain.rendezvous import _RENDEZVOUS_NS, forget_rendezvous, rendezvous_key

    ray = ray_local
    key = rendezvous_key("test")
    meet = ray.remote(num_cpus=0)(_meet)
    late0, early1 = meet.remote(key, 0, 2.0), meet.remote(key, 1, 0.0)  # rank 1 asks before rank 0 exists
    (port0, got0), (port1, got1) = ray.get([late0, early1])
    assert port0 == port1 > 0 and (got0, got1) == ("1", "0")
    assert int(internal_kv._internal_kv_get(key, namespace=_RENDEZVOUS_NS)) == port0
    forget_rendezvous(key)
    assert internal_kv._internal_kv_get(key, namespace=_RENDEZVOUS_NS) is None


# ------------------------------------------------------------------ two nodes, one machine
RECIPE = """
name: nodes
seed: 0
model: {{preset: tiny-hybrid, overrides: {{num_hidden_layers: 2}}}}
cluster: {cluster}
run_dir: {run_dir}
stages:
  - name: rl
    kind: rl
    steps: 2
    data: {{task: arithmetic, format: rl, task_args: {{n_train: 32, n_eval: 8}}}}
    prompts_per_step: 4
    sampling: {{n: 4, max_new_tokens: 3}}
    filters: {{dynamic_sampling: false}}
    reward: {{fn: digit_match}}
    micro_size: 8
    optim: {{lr: 1.0e-3}}
    eval: {{every: 0, max_new_tokens: 3, limit: 4}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, name: str, cluster: str, env: dict | None = None) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load_file

    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(cluster=cluster, run_dir=tmp_path / name)))
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe)], capture_output=True, text=True,
                         timeout=900, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return load_file(str(tmp_path / name / "stages" / "00-rl" / "final" / "model.safetensors")), out.stdout


@pytest.mark.slow
def test_learners_spanning_two_nodes_give_the_same_update_as_one_node(tmp_path):
    port = _free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Ray's token authentication stays on: the nodes and the driver share a token of this test
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    common = ["--num-cpus=1", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    nodes = [subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        time.sleep(5)
        nodes.append(subprocess.Popen([ray_bin, "start", f"--address=127.0.0.1:{port}", *common],
                                      start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=env))
        wait = ("import ray, time; ray.init(address='127.0.0.1:%d', log_to_driver=False)\n"
                "t = time.time()\n"
                "while len([n for n in ray.nodes() if n['Alive']]) < 2 and time.time() - t < 120: time.sleep(1)\n"
                "print(len([n for n in ray.nodes() if n['Alive']]))" % port)
        alive = subprocess.run([sys.executable, "-c", wait], capture_output=True, text=True, timeout=300, env=env)
        assert alive.stdout.strip().endswith("2"), alive.stdout + alive.stderr[-2000:]
        # one CPU per node and one per learner rank: Ray must put the two ranks on different nodes
        two, log = _run(tmp_path, "two-nodes", f"{{address: '127.0.0.1:{port}', learners: 2, cpus_per_learner: 1}}",
                        env)
        nodes_used = {w for line in log.splitlines() if line.startswith("learners:")
                      for w in re.findall(r"node (\w+)", line)}
        assert len(nodes_used) == 2, log[-2000:]
    finally:
        for p in nodes:
            os.killpg(p.pid, signal.SIGTERM)
        for p in nodes:
            p.wait(timeout=60)
    one, _ = _run(tmp_path, "one-node", "{num_cpus: 2, learners: 2, cpus_per_learner: 1}")
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6, rtol=0), k
