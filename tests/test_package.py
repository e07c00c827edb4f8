"""Install layout: the extension, the kernels mapping, the ops' registrations."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import nested_learning as nl


def test_kernels_are_installed_as_a_subpackage():
    assert importlib.util.find_spec("nested_learning.kernels") is not None


@pytest.mark.skipif(os.environ.get("NL_DISABLE_EXT") == "1", reason="extension disabled on purpose (fallback run)")
def test_extension_registers_the_cpu_kernels():
    if not nl.HAS_EXT:
        pytest.fail(f"nested_learning._C did not load: {nl.EXT_ERROR}")
    for name in ("delta_rule_fwd_cpp", "delta_rule_bwd_cpp"):
        dump = torch._C._dispatch_dump(f"nested_learning::{name}")
        assert "CPU:" in dump, dump


def test_public_ops_are_custom_ops():
    for name in ("delta_rule", "delta_rule_bwd"):
        assert hasattr(torch.ops.nested_learning, name)
