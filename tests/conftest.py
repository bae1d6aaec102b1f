"""Shared fixtures: a fresh random generator per test (seed printed on failure; set
CEM_TEST_SEED to replay one) and a record of the largest errors seen, printed at the end."""

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
