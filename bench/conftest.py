"""pytest-benchmark suites over the shared case registry (``nested_learning.benchmark``).

With ``--benchmark-disable`` (CI) every benchmark runs once as a test, on the quick cases.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
