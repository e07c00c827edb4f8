"""The correctness rule every backend of every op is held to.

A quantity x computed by a backend is compared with the same quantity computed by the
reference in float64, x64. Its error is the relative Frobenius error

    err(x) = ‖x − x64‖ / ‖x64‖          (‖x − x64‖ when x64 = 0)

and it passes when

    err(backend) ≤ 2 · err(PyTorch reference in the backend's dtype) + floor(dtype)

where the PyTorch reference error is the largest over the op's reference formulations run on
the same inputs in the same dtype (e.g. the token loop and the chunked form), and the floor is
the unit roundoff of the dtype (a small absolute allowance for quantities that are exactly 0).
The same rule applies to outputs, states and every gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

__all__ = ["FLOOR", "relative_error", "Verdict", "judge"]

FLOOR: dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}


def relative_error(x: Tensor, truth: Tensor) -> float:
    """‖x − truth‖ / ‖truth‖ in float64 (absolute when ‖truth‖ = 0; inf on a shape mismatch or NaN)."""
    if x.shape != truth.shape:
        return float("inf")
    diff = torch.linalg.vector_norm(x.detach().double() - truth.detach().double()).item()
    norm = torch.linalg.vector_norm(truth.detach().double()).item()
    err = diff / norm if norm > 0 else diff
    return err if err == err else float("inf")  # NaN → inf


@dataclass(frozen=True)
class Verdict:
    """One quantity's comparison: the backend's error, its budget, and whether it passed."""

    quantity: str
    error: float
    reference_error: float
    budget: float

    @property
    def passed(self) -> bool:
        """Within budget; never when the budget is infinite (a non-finite truth or reference)."""
        return self.error <= self.budget < float("inf")

    @property
    def ratio(self) -> float:
        """error / budget (≤ 1 passes)."""
        return self.error / self.budget if self.budget > 0 else float("inf")


def judge(
    candidate: Mapping[str, Tensor],
    truth: Mapping[str, Tensor],
    references: list[Mapping[str, Tensor]],
    dtype: torch.dtype,
) -> list[Verdict]:
    """Apply the rule to every quantity of ``truth`` (outputs and gradients, by name)."""
    verdicts = []
    for name, exact in truth.items():
        ref_err = max(relative_error(r[name], exact) for r in references)
        budget = 2.0 * ref_err + FLOOR[dtype]
        err = relative_error(candidate[name], exact) if name in candidate else float("inf")
        verdicts.append(Verdict(name, err, ref_err, budget))
    return verdicts
