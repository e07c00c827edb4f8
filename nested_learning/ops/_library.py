"""Backend registry: what is built, what is importable, and which backend serves a call.

Backends of every op:

- ``reference``: plain PyTorch (``nested_learning.reference``), any device, always present;
- ``cpp``: the C++ CPU kernels of the optional extension ``nested_learning._C``;
- ``triton``: the Triton kernels (``nested_learning.kernels``), CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` (tests only).

Default choice: CUDA tensors → ``triton`` (else ``reference``); CPU tensors → ``cpp`` (else
``reference``). ``NL_BACKEND=reference|cpp|triton`` or :func:`use_backend` forces one; a forced
backend that cannot serve the call is an error, never a silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from typing import Iterator, Optional

import torch

__all__ = [
    "BACKENDS",
    "HAS_EXT",
    "EXT_ERROR",
    "HAS_TRITON",
    "autocast",
    "autocast_off",
    "available",
    "forced_backend",
    "select",
    "use_backend",
]

BACKENDS = ("reference", "cpp", "triton")

HAS_EXT = False
EXT_ERROR: Optional[BaseException] = None
if os.environ.get("NL_DISABLE_EXT", "0") != "1":
    try:
        from .. import _C  # noqa: F401  (import runs the C++ op registrations)

        HAS_EXT = True
    except ImportError as err:
        EXT_ERROR = err
else:
    EXT_ERROR = ImportError("disabled by NL_DISABLE_EXT=1")

HAS_TRITON = importlib.util.find_spec("triton") is not None

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("nl_backend", default=None)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run on ``device``, and if not, why."""
    if backend == "reference":
        return True, ""
    if backend == "cpp":
        if device.type != "cpu":
            return False, f"the cpp backend runs on CPU tensors only, got {device.type}"
        if not HAS_EXT:
            return False, f"nested_learning._C is not built or failed to load ({EXT_ERROR})"
        return True, ""
    if backend == "triton":
        if not HAS_TRITON:
            return False, "triton is not installed"
        if device.type == "cuda" and torch.cuda.is_available():
            return True, ""
        if device.type == "cpu" and _interpreting():
            return True, ""
        return False, f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {device.type}"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The activations an op takes, in the autocast dtype when autocast is on for their device
    (float32/bfloat16/float16 ones; float64 stays), else unchanged: the ops run in the precision
    the surrounding matmuls do, as ``torch.nn.functional.linear`` would."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else t for t in tensors)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``device``: an op's body computes in the dtypes of its contract (the
    reference backend's PyTorch matmuls would otherwise follow an enclosing autocast)."""
    return torch.autocast(device.type, enabled=False)


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or ``NL_BACKEND``, if any (validated)."""
    name = _forced.get() or os.environ.get("NL_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"NL_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def select(device: torch.device) -> str:
    """The backend that serves a call on ``device``: the forced one, else the default."""
    name = forced_backend()
    if name is not None:
        ok, why = available(name, device)
        if not ok:
            raise RuntimeError(f"backend {name!r} was forced but cannot run: {why}")
        return name
    preferred = "triton" if device.type == "cuda" else "cpp"
    return preferred if available(preferred, device)[0] else "reference"


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force ``name`` for every op called inside the block (``None``: defer to ``NL_BACKEND``)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)
