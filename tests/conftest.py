"""Shared fixtures: a fresh random seed per test for its generator and for torch's global one
(printed on failure; set CEM_TEST_SEED to replay it) and a record of the largest errors seen,
printed at the end."""

from __future__ import annotations

import os
import random

import pytest
import torch

import cem_ops  # noqa: F401  (registers the ops)

_LARGEST_ERRORS: dict[str, float] = {}


@pytest.fixture
def rng(request) -> torch.Generator:
    seed = int(os.environ.get("CEM_TEST_SEED", random.SystemRandom().randrange(2**31)))
    request.node.user_properties.append(("seed", seed))
    generator = torch.Generator().manual_seed(seed)
    return generator


@pytest.fixture(autouse=True)
def _global_generator_follows_the_seed(rng):
    """Draws from torch's global generator replay with the test's printed seed as well."""
    torch.manual_seed(rng.initial_seed())


@pytest.fixture
def record_error():
    """record_error(kind, value): keeps the largest value per kind for the end-of-run summary."""

    def record(kind: str, value: float) -> float:
        _LARGEST_ERRORS[kind] = max(_LARGEST_ERRORS.get(kind, 0.0), value)
        return value

    return record


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                item.add_report_section("call", "seed", f"CEM_TEST_SEED={value} replays this test's inputs")


def pytest_terminal_summary(terminalreporter):
    if _LARGEST_ERRORS:
        terminalreporter.section("largest relative errors seen")
        for kind, value in sorted(_LARGEST_ERRORS.items()):
            terminalreporter.write_line(f"{kind}: {value:.3e}")
