"""The case registry shared by ``nested-learning check``/``bench`` and the suites in ``bench/``.

``SPECS`` maps every op name to its :class:`~nested_learning.benchmark.core.Spec`: cases,
inputs, ground truth, baselines and work model, one module per op (same stem as ``ops``).
"""

from .core import Case, Spec
from .delta_rule import SPEC as DELTA_RULE

SPECS: dict[str, Spec] = {DELTA_RULE.op: DELTA_RULE}

__all__ = ["SPECS", "Case", "Spec"]
