"""The shipped example of a user's own loss (examples/custom_loss.py) passes every check,
the optimisation on the toy hybrid included. examples/ is not a package: load it by path."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from posttrain.algorithms.custom import policy_loss_signature_error
from posttrain.testing import check_policy_loss

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_loss.py"


def load_example():
    spec = importlib.util.spec_from_file_location("custom_loss_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_fits_the_convention():
    fn = load_example().clipped_reinforce
    assert policy_loss_signature_error(fn, {"clip": 0.3}) is None
    assert "'eps'" in policy_loss_signature_error(fn, {"eps": 0.3})


@pytest.mark.slow
def test_example_loss_passes_every_check():
    reports = check_policy_loss(load_example().clipped_reinforce, args={"clip": 0.3})
    assert len(reports) == 7 and all(r.passed for r in reports), reports
