"""The local Ray instance's trust boundary (docs/cluster.md): a run starts its own instance
(never one that RAY_ADDRESS or an earlier `ray start` points at), with Ray's token
authentication on, so a client without the token is refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

DRIVER = textwrap.dedent("""
    import json, os, subprocess, sys
    os.environ["RAY_ADDRESS"] = "127.0.0.1:1"  # nothing listens there: joining it would fail
    import ray
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from posttrain.cluster import ClusterConfig, start_ray

    start_ray(ClusterConfig(num_cpus=1))
    node = ray._private.worker._global_node
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["RAY_AUTH_MODE"] = "token"
    probe = "import ray; ray.init(address=%r); print('JOINED')" % node.gcs_address

    def joins(**extra):
        r = subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True, text=True,
                           timeout=180)
        return "JOINED" in r.stdout

    print(json.dumps({"head": node.head, "token_auth": is_token_auth_enabled(), "gcs": node.gcs_address,
                      "with_token": joins(),  # the token Ray saved for this user (~/.ray/auth_token)
                      "wrong_token": joins(RAY_AUTH_TOKEN="0" * 32)}))
    ray.shutdown()
""")


@pytest.mark.slow
def test_local_instance_is_new_and_requires_the_token():
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # Ray's default for a new cluster
    p = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env=env, timeout=400)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-2000:]
    out = json.loads(lines[-1])
    assert out["head"] and not out["gcs"].endswith(":1")  # its own instance, not RAY_ADDRESS's
    assert out["token_auth"]
    assert out["with_token"] and not out["wrong_token"], out  # refused for its token alone
