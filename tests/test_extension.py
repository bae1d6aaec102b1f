"""The compiled extension: build information and the refusal of a stale binary."""

from __future__ import annotations

import pytest
import torch

import cem_ops
from cem_ops import _extension

# The package imported from an installed wheel has no sources beside it: no stale check, no
# "pip install -e ." hint.
needs_source_checkout = pytest.mark.skipif(
    not _extension._is_source_checkout(),
    reason=f"cem_ops is imported from {_extension.PACKAGE_DIR}, not from a source checkout")


def test_build_info_describes_the_binary():
    info = cem_ops.build_info()
    assert info["torch_version"] == torch.__version__
    assert set(info["kernels"]) == {"attention_fwd", "attention_bwd", "attention_cached", "mlp_fwd", "mlp_bwd"}
    for backends in info["kernels"].values():
        assert set(backends.values()) <= {"compiled", "reference"}


def test_every_op_is_registered():
    for name in ("attention", "attention_energy", "attention_cached", "mlp", "mlp_energy", "attention_fwd",
                 "attention_bwd", "mlp_fwd", "mlp_bwd"):
        assert hasattr(torch.ops.cem, name)


@needs_source_checkout
def test_stale_extension_is_refused(monkeypatch):
    monkeypatch.setattr(_extension, "source_hash", lambda root: "0" * 16)
    monkeypatch.delenv("CEM_OPS_ALLOW_STALE", raising=False)
    with pytest.raises(ImportError, match="stale.*pip install --no-build-isolation -e ."):
        _extension.load_extension()
    monkeypatch.setenv("CEM_OPS_ALLOW_STALE", "1")
    with pytest.warns(UserWarning, match="stale"):
        _extension.load_extension()


def test_torch_version_mismatch_is_refused(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    with pytest.raises(ImportError, match="built against torch .* but torch 0.0.1 is installed"):
        _extension.load_extension()


@needs_source_checkout
def test_missing_extension_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "PACKAGE_DIR", tmp_path)
    with pytest.raises(ImportError, match="is not built .*pip install --no-build-isolation -e ."):
        _extension.load_extension()


def test_extension_from_another_checkout_is_refused(monkeypatch, tmp_path):
    (tmp_path / "_C.cpython-test.so").write_text("")  # this "package" has a binary of its own
    monkeypatch.setattr(_extension, "PACKAGE_DIR", tmp_path)
    with pytest.raises(ImportError, match="was loaded from .*, not from this package"):
        _extension.load_extension()


def test_outside_a_source_checkout_the_hint_is_a_wheel(monkeypatch, tmp_path):
    monkeypatch.setattr(_extension, "SOURCE_ROOT", tmp_path)
    assert "wheel" in _extension.rebuild_hint()
