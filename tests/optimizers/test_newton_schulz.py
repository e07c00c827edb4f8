"""Batched quintic Newton–Schulz orthogonalisation."""

from __future__ import annotations

import pytest
import torch

from nested_learning.optimizers.newton_schulz import default_dtype, newton_schulz, orthogonalize

f64 = dict(dtype=torch.float64)


def literal(g: torch.Tensor, steps: int = 5, a=3.4445, b=-4.7750, c=2.0315, eps=1e-7) -> torch.Tensor:
    """One matrix, written out: normalise, transpose tall to wide, iterate, transpose back."""
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / max(x.norm().item(), eps)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.shape[0] > g.shape[1] else x


@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (5, 5), (1, 7), (2, 3, 4, 6)])
def test_matches_the_literal_iteration(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0), **f64)
    got = newton_schulz(g, dtype=torch.float64)
    expected = torch.stack([literal(m) for m in g.reshape(-1, *shape[-2:])]).reshape(shape)
    assert got.shape == g.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_batched_call_equals_per_matrix_calls():
    g = torch.randn(5, 8, 12, generator=torch.Generator().manual_seed(1))
    batched = newton_schulz(g, dtype=torch.float32)
    for i in range(5):
        torch.testing.assert_close(batched[i], newton_schulz(g[i], dtype=torch.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(16, 32), (32, 16)])
def test_result_is_the_polar_factor_up_to_singular_values_near_one(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2), **f64)
    o = newton_schulz(g, dtype=torch.float64)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.6 and s.max() < 1.25  # the quintic's coefficients trade exactness for speed
    # same singular vectors as g: O Gᵀ = U f(S) S Uᵀ is symmetric positive semi-definite
    p = o @ g.T if shape[0] <= shape[1] else g.T @ o
    torch.testing.assert_close(p, p.T, rtol=1e-9, atol=1e-9)
    assert torch.linalg.eigvalsh(p).min() > -1e-9


def test_transpose_of_a_tall_matrix_is_the_wide_result():
    g = torch.randn(9, 4, generator=torch.Generator().manual_seed(3), **f64)
    torch.testing.assert_close(newton_schulz(g, dtype=torch.float64), newton_schulz(g.T, dtype=torch.float64).T)


def test_zero_matrix_stays_zero():
    assert torch.equal(newton_schulz(torch.zeros(3, 5), dtype=torch.float32), torch.zeros(3, 5))


def test_compute_dtype():
    g = torch.randn(4, 6)
    assert newton_schulz(g).dtype == default_dtype(g.device)
    assert newton_schulz(g, dtype=torch.float32).dtype == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert default_dtype(torch.device("cpu")) in (torch.bfloat16, torch.float32)


def test_orthogonalize_groups_by_shape_and_keeps_order():
    gen = torch.Generator().manual_seed(4)
    mats = [torch.randn(s, generator=gen) for s in [(4, 6), (6, 4), (4, 6), (3, 3), (4, 6)]]
    mats.append(torch.randn(4, 6, generator=gen, **f64))
    out = orthogonalize(mats, steps=3, dtype=torch.float64)
    assert [o.shape for o in out] == [m.shape for m in mats]
    for o, m in zip(out, mats):
        torch.testing.assert_close(o, newton_schulz(m, steps=3, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="2-D"):
        orthogonalize([torch.zeros(3)])
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        newton_schulz(torch.zeros(3))
    with pytest.raises(ValueError, match="coefficients"):
        newton_schulz(torch.zeros(2, 2), coefficients=(1.0, 2.0))


@pytest.mark.slow
def test_compiles_to_the_eager_result():
    g = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(newton_schulz, fullgraph=True)
    torch.testing.assert_close(compiled(g, dtype=torch.float32), newton_schulz(g, dtype=torch.float32))
