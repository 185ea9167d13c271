"""Shared fixtures: one local Ray instance per test session (dashboard off); torch on one thread."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # "local": a new instance even when the machine runs others (RAY_ADDRESS, `ray start`)
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the machines are 2-core and shared), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok():
    """The char tokenizer the demo uses (built from its fixed alphabet, no files)."""
    from posttrain.testing import char_tokenizer

    return char_tokenizer()
