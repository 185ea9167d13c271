"""Where the ranks of a process group meet when they are Ray actors: rank 0 opens the group's
TCPStore on a port the kernel picks at bind time and publishes it in Ray's key-value store (the
GCS); the other ranks read it there. DeepSpeed's learner ranks and the weight-broadcast group
(learner rank 0 + rollout workers) both meet this way.

The usual recipe (a free port chosen by the driver, bound later by rank 0 in another process,
after the actors start) leaves seconds in which any process of a busy node can take the port:
rank 0 then dies at start with EADDRINUSE.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

_RENDEZVOUS_NS = "posttrain-rendezvous"  # Ray GCS key-value namespace of the process groups' ports


def node_ip() -> str:
    """This node's IP as Ray sees it: where the ranks of a process group meet rank 0."""
    import ray

    return ray.util.get_node_ip_address()


def rendezvous_key(name: str) -> str:
    """A key no other process group of this Ray cluster uses."""
    return f"{name}-{uuid.uuid4().hex}"


def rendezvous_store(key: str, addr: str, rank: int, world: int, timeout_s: float = 600.0) -> Any:
    """The TCPStore of rank `rank` of a `world`-rank group meeting under `key`: rank 0 opens it
    (port 0: the kernel picks a free one as it binds) and publishes the port; the other ranks
    wait up to `timeout_s` for it and connect to `addr`, rank 0's node."""
    import datetime

    import torch.distributed as tdist
    from ray.experimental import internal_kv

    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        store = tdist.TCPStore(addr, 0, world, is_master=True, wait_for_workers=False, timeout=timeout)
        internal_kv._internal_kv_put(key, str(store.port), namespace=_RENDEZVOUS_NS)
        return store
    deadline = time.monotonic() + timeout_s
    while (port := internal_kv._internal_kv_get(key, namespace=_RENDEZVOUS_NS)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"process group {key}: rank 0 did not open its store within {timeout_s:.0f} s")
        time.sleep(0.02)
    return tdist.TCPStore(addr, int(port), world, is_master=False, timeout=timeout)


def forget_rendezvous(key: str) -> None:
    """Drop a process group's published port (the driver, when the group shuts down)."""
    import ray
    from ray.experimental import internal_kv

    if ray.is_initialized():
        internal_kv._internal_kv_del(key, namespace=_RENDEZVOUS_NS)
