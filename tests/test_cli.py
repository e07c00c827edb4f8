"""The ``nested-learning`` command: doctor, check and bench end to end (small cases)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from nested_learning import cli
from nested_learning.benchmark import SPECS
from nested_learning.benchmark.delta_rule import _case

SPEC = SPECS["delta_rule"]


def test_doctor_reports_every_backend(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for item in ("torch", "triton", "nested_learning._C", "backend reference on cpu", "backend cpp on cpu"):
        assert item in out


def test_check_passes_and_fails_honestly(capsys, monkeypatch):
    assert cli.main(["check", "--op", "delta_rule", "--backend", "reference", "--device", "cpu"]) == 0
    assert "passed, 0 failed" in capsys.readouterr().out
    # a backend that returns wrong numbers must fail the check and the exit code
    module = sys.modules["nested_learning.ops.delta_rule"]
    good = module.BACKEND_FUNCTIONS["reference"]
    broken = module._Backend(lambda *a: tuple(x * 1.001 for x in good.forward(*a)), good.backward)
    monkeypatch.setitem(module.BACKEND_FUNCTIONS, "reference", broken)
    assert cli.main(["check", "--op", "delta_rule", "--backend", "reference", "--device", "cpu"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_bench_writes_json_and_plot(tmp_path, monkeypatch, capsys):
    tiny = [_case(torch.float32, 1, 64, 2, 16, 16)]
    monkeypatch.setattr(SPEC, "bench_cases", lambda device, quick: tiny)
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    args = ["bench", "--op", "delta_rule", "--quick", "--device", "cpu", "--json", str(out_json)]
    if _has_matplotlib():
        args += ["--plot", str(out_png)]
    assert cli.main(args) == 0
    data = json.loads(out_json.read_text())
    rows = data["rows"]
    assert data["meta"]["torch"] == torch.__version__
    impls = {r["implementation"] for r in rows}
    assert {"reference", "reference.chunked", "token loop"} <= impls
    for r in rows:
        assert r["passed"] and r["median_ms"] > 0 and r["mode"] in ("fwd", "fwd+bwd")
    chunked = next(r for r in rows if r["implementation"] == "reference.chunked" and r["mode"] == "fwd")
    assert chunked["speedups"]["reference.chunked"] == pytest.approx(1.0)
    if _has_matplotlib():
        assert out_png.stat().st_size > 1000


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_bad_arguments_exit_with_a_message():
    with pytest.raises(SystemExit, match="--op must be one of"):
        cli.main(["check", "--op", "nope"])


def test_bench_of_an_in_place_op_reports_floor_and_speedups(tmp_path, monkeypatch):
    from nested_learning.benchmark.cms_accumulate import _case as acc_case

    spec = SPECS["cms_accumulate"]
    monkeypatch.setattr(spec, "bench_cases", lambda device, quick: [acc_case(torch.float32, 2, 16, 24, "adamw", "first")])
    every = spec.baselines
    monkeypatch.setattr(spec, "baselines", lambda case, device: {"foreach": every(case, device)["foreach"]})
    out_json = tmp_path / "acc.json"
    assert cli.main(["bench", "--op", "cms_accumulate", "--quick", "--device", "cpu", "--json", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert {r["mode"] for r in rows} == {"step"}
    kinds = {r["implementation"]: r["kind"] for r in rows}
    assert kinds["foreach_add_ floor"] == "floor" and kinds["foreach"] == "baseline" and kinds["reference"] == "backend"
    for r in rows:
        assert r["median_ms"] > 0 and (r["passed"] or r["kind"] == "floor")
    foreach = next(r for r in rows if r["implementation"] == "foreach")
    assert foreach["speedups"]["foreach"] == pytest.approx(1.0) and "reference" in foreach["speedups"]
