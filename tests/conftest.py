"""Test-session setup: interpret Triton kernels on CPU when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported (triton decorates its own
helpers at import), so it is set here, before any test module loads.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
