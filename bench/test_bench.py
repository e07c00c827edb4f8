"""One benchmark per (op, case, implementation, mode) of the registry; each implementation is
timed only after it passed the correctness check on the same inputs.

    pytest bench --benchmark-json=out.json          # time everything (full case list)
    pytest bench --benchmark-disable                # run each once as a test (quick cases)
"""

from __future__ import annotations

import functools

import pytest
import torch

from nested_learning.benchmark import SPECS
from nested_learning.benchmark.core import Checker, timed_call
from nested_learning.benchmark.runner import device_name, timing_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _params(quick: bool) -> list:
    params = []
    for op, spec in SPECS.items():
        for case in spec.bench_cases(DEVICE, quick):
            impls = [(b, True) for b in timing_backends(spec, case, DEVICE)] + [(n, False) for n in spec.baselines(case, DEVICE)]
            params += [pytest.param(op, case, name, is_backend, mode, id=f"{case.name}/{name}/{mode}")
                       for name, is_backend in impls for mode in spec.modes]
    return params


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = metafunc.config.getoption("benchmark_disable")
        metafunc.parametrize("op,case,implementation,is_backend,mode", _params(quick))


@functools.lru_cache(maxsize=4)
def _checker(op, case) -> Checker:
    return Checker(SPECS[op], case, DEVICE)


def test_bench(benchmark, op, case, implementation, is_backend, mode):
    spec = SPECS[op]
    checker = _checker(op, case)
    impl = spec.call if is_backend else spec.baselines(case, DEVICE)[implementation]
    backend = implementation if is_backend else None
    result = checker.check(implementation, impl, backend)
    assert result.passed, (result.error, result.worst)
    benchmark.group = f"{case.name} [{mode}]"
    benchmark.extra_info.update(device=device_name(DEVICE), shape=case.shape, dtype=str(case.dtype), mode=mode,
                                implementation=implementation, worst_error_ratio=result.worst.ratio)
    benchmark(timed_call(spec, impl, checker.inputs, mode, backend=backend))
