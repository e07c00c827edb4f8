"""Helpers shared by the Triton kernel modules (``nested_learning.kernels._common``): which device
an entry point makes current, and that every kernel module launches through the shared helper."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from nested_learning.kernels import _common  # noqa: E402

pytestmark = pytest.mark.triton


def test_first_device_searches_lists_depth_first():
    meta = torch.empty(1, device="meta")
    assert _common.first_device((1.0, None, [[], (meta,)], torch.empty(1))) == torch.device("meta")
    assert _common.first_device((2, "x", [])) is None


def test_entry_points_make_the_inputs_cuda_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(_common.torch.cuda, "device", device)
    seen = _common.on_input_device(lambda *args, scale=1: (len(args), scale))
    assert seen([torch.empty(1)], scale=3) == (1, 3) and entered == []  # CPU inputs: nothing entered
    cuda1 = torch.device("cuda", 1)
    monkeypatch.setattr(_common, "first_device", lambda args: cuda1)
    assert seen(torch.empty(1)) == (1, 1) and entered == [cuda1]


@pytest.mark.parametrize("module", ["delta_rule", "cms_chunk_update", "memory_mlp_momentum"])
def test_kernel_modules_launch_through_the_shared_helper(module):
    import importlib

    kernels = importlib.import_module(f"nested_learning.kernels.{module}")
    assert kernels._launch is _common.launch
