"""The case registry shared by ``nested-learning check``/``bench`` and the suites in ``bench/``.

``SPECS`` maps every op name to its :class:`~nested_learning.benchmark.core.Spec`: cases,
inputs, ground truth, baselines and work model, one module per op (same stem as ``ops``).
"""

from .cms_accumulate import SPEC as CMS_ACCUMULATE
from .cms_chunk_update import SPEC as CMS_CHUNK_UPDATE
from .core import Case, Spec
from .delta_rule import SPEC as DELTA_RULE
from .memory_mlp_momentum import SPEC as MEMORY_MLP_MOMENTUM

SPECS: dict[str, Spec] = {s.op: s for s in (DELTA_RULE, CMS_ACCUMULATE, CMS_CHUNK_UPDATE, MEMORY_MLP_MOMENTUM)}

__all__ = ["SPECS", "Case", "Spec"]
