"""The device suite (``python -m nested_learning.benchmark.device_suite``): the budget, part
isolation and the summary on stand-in parts, then its real benchmark commands at toy sizes on
the CPU, so that a GPU session never finds a broken command line."""

from __future__ import annotations

import json
import sys

import pytest

from nested_learning.benchmark import device_suite as suite


def _part(name: str, code: str, limit: float = 30, minimum: float = 0) -> suite.Part:
    return suite.Part(name, f"stand-in {name}", lambda o: ["-c", code] if code else None, limit=limit, minimum=minimum)


def test_parts_run_in_order_and_failures_stay_in_their_part(tmp_path):
    parts = (
        _part("crashes", "import sys; print('boom'); sys.exit(3)"),
        _part("hangs", "import time; time.sleep(30)", limit=1.0),
        _part("skipped", ""),
        _part("fine", "print('ok')"),
        _part("too_big", "print('never')", minimum=10_000),
    )
    summary = suite.run(suite.Options(tmp_path, "cpu"), budget=60, parts=parts)
    assert [summary[p.name]["status"] for p in parts] == ["failed", "timeout", "not run here", "ok", "no time left"]
    assert summary["crashes"]["returncode"] == 3
    assert summary["hangs"]["seconds"] < 10
    assert "boom" in (tmp_path / "crashes.log").read_text()
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert not (tmp_path / "too_big.log").exists()


def test_a_part_gets_only_the_budget_that_is_left(tmp_path):
    parts = (_part("first", "import time; time.sleep(30)", limit=60), _part("second", "print(1)", minimum=1))
    summary = suite.run(suite.Options(tmp_path, "cpu"), budget=1.5, parts=parts)
    assert summary["first"]["status"] == "timeout" and summary["first"]["seconds"] < 10
    assert summary["second"]["status"] == "no time left"


def test_select_keeps_suite_order_and_names_unknown_parts():
    assert [p.name for p in suite.select("hope_block,doctor")] == ["doctor", "hope_block"]
    assert suite.select(None) == suite.PARTS
    with pytest.raises(ValueError, match="unknown \\['nope'\\]"):
        suite.select("doctor,nope")


def test_main_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        suite.main(["--parts", "nope", "--out", str(tmp_path)])
    assert "parts must be among" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.main(["--budget", "0", "--out", str(tmp_path)])
    assert "--budget must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.main([])
    assert "--out is required" in capsys.readouterr().err


def test_gpu_only_parts_are_not_run_on_cpu(tmp_path):
    options = suite.Options(tmp_path, "cpu", quick=True)
    gpu_only = {p.name for p in suite.PARTS if p.argv(options) is None}
    assert gpu_only == {"triton_tests", "bench_ops"}
    cuda = suite.Options(tmp_path, "cuda")
    assert all(p.argv(cuda) is not None for p in suite.PARTS)


@pytest.mark.slow
def test_benchmark_commands_run_at_toy_sizes(tmp_path):
    names = "optimizer_steps,orthogonal_steps,model_throughput,hope_block"
    assert suite.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--parts", names, "--budget", "400"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {n: s["status"] for n, s in summary.items()} == dict.fromkeys(names.split(","), "ok")
    steps = json.loads((tmp_path / "optimizer_steps.json").read_text())
    assert {r["optimizer"] for r in steps} >= {"DeepMomentumGD (fused)", "AdamW(foreach)"}
    assert all(r["dtype"] == "bfloat16" and r["median_ms"] > 0 for r in steps)
    throughput = json.loads((tmp_path / "model_throughput.json").read_text())
    assert [r["model"] for r in throughput] == ["hope", "transformer"]
    assert sys.executable in summary["hope_block"]["command"]
