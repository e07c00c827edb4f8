"""LinearAttentionWithMemory against the reference library's per-head token loop (float64,
outputs and gradients), causality, carried memory, dropout, bad input and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nested_learning.models.linear_attention import LinearAttentionWithMemory

F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _module(chunk_size=4, dim=8, n_heads=2, dropout=0.0, seed=0) -> LinearAttentionWithMemory:
    torch.manual_seed(seed)
    return LinearAttentionWithMemory(dim, n_heads, dropout, chunk_size=chunk_size).double().eval()


def loop_reference(m: LinearAttentionWithMemory, x, memory=None, key_sum=None):
    """Per head and token: S += φ(k) vᵀ, z += φ(k), y = Sᵀφ(q) / (z·φ(q) + 1e-6); then W_o."""
    B, T, D = x.shape
    H, dh = m.n_heads, D // m.n_heads
    q = (F.elu(m.W_q(x)) + 1).view(B, T, H, dh)
    k = (F.elu(m.W_k(x)) + 1).view(B, T, H, dh)
    v = m.W_v(x).view(B, T, H, dh)
    s = torch.zeros(B, H, dh, dh, dtype=x.dtype) if memory is None else memory
    z = torch.zeros(B, H, dh, dtype=x.dtype) if key_sum is None else key_sum
    ys = []
    for t in range(T):
        s = s + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + k[:, t]
        num = (s * q[:, t, :, :, None]).sum(-2)
        ys.append(num / ((z * q[:, t]).sum(-1, keepdim=True) + 1e-6))
    return m.W_o(torch.stack(ys, 1).reshape(B, T, D)), s, z


def _grads(out, inputs, seed=1):
    cot = _randn(*out.shape, seed=seed).to(out.dtype)
    return torch.autograd.grad((out * cot).sum(), inputs)


@pytest.mark.parametrize("chunk_size", [3, 4, 64])
def test_equals_reference_token_loop_with_gradients(chunk_size):
    m = _module(chunk_size)
    x = _randn(2, 10, 8).requires_grad_()
    out = m(x)
    ref, s, z = loop_reference(m, x)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m.memory, torch.cat([s, z[..., None]], -1), atol=1e-10, rtol=1e-10)
    leaves = [x, *m.parameters()]
    for a, b in zip(_grads(out, leaves), _grads(ref, leaves)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_float32_is_close_to_float64():
    m = _module(chunk_size=16, dim=16, n_heads=4)
    x = _randn(2, 45, 16)
    ref, _, _ = loop_reference(m, x)
    out = m.float()(x.float())
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() / ref.abs().max() < 5e-6


def test_is_causal():
    m = _module(chunk_size=4)
    x = _randn(2, 11, 8)
    for t in (0, 4, 7, 10):
        x2 = x.clone()
        x2[:, t] -= 2.0
        y, y2 = m(x), m(x2)
        assert torch.equal(y[:, :t], y2[:, :t])
        assert not torch.allclose(y[:, t], y2[:, t])


def test_reset_memory_false_continues_the_previous_call():
    m = _module(chunk_size=4)
    x = _randn(3, 13, 8)
    whole = m(x)
    kept = m.memory.clone()
    first = m(x[:, :5])
    second = m(x[:, 5:], reset_memory=False)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(m.memory, kept, atol=1e-10, rtol=1e-10)
    assert not m.memory.requires_grad
    fresh = m(x[:, 5:])  # the default (the reference's behaviour) starts from zero
    torch.testing.assert_close(fresh, loop_reference(m, x[:, 5:])[0], atol=1e-10, rtol=1e-10)
    m.reset_memory()
    assert m.memory is None
    torch.testing.assert_close(m(x[:, 5:], reset_memory=False), fresh, atol=0, rtol=0)


def test_dropout_follows_the_output_projection():
    m = _module(dropout=0.5)
    x = _randn(2, 9, 8)
    clean = m(x)
    m.train()
    dropped = m(x)
    kept = dropped != 0
    assert 0 < kept.sum() < kept.numel()
    torch.testing.assert_close(dropped[kept], 2 * clean[kept])


def test_defaults_mirror_the_reference():
    m = LinearAttentionWithMemory(16)
    assert (m.n_heads, m.head_dim, m.dropout.p) == (8, 2, 0.1)
    assert all(w.bias is None for w in (m.W_q, m.W_k, m.W_v, m.W_o))
    assert m.memory is None


def test_bad_input_raises_before_touching_memory():
    m = _module()
    m(_randn(2, 5, 8))
    before = m.memory.clone()
    with pytest.raises(ValueError, match="x must have shape"):
        m(_randn(2, 5, 6))
    with pytest.raises(ValueError, match="x must have shape"):
        m(_randn(5, 8))
    with pytest.raises(TypeError, match="x must be a floating"):
        m(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="x must have the dtype"):
        m(torch.ones(2, 5, 8))
    with pytest.raises(ValueError, match="batch size 3"):
        m(_randn(3, 5, 8), reset_memory=False)
    assert torch.equal(m.memory, before)
    with pytest.raises(ValueError, match="num_heads"):
        LinearAttentionWithMemory(8, n_heads=3)
    with pytest.raises(ValueError, match="chunk_size"):
        LinearAttentionWithMemory(8, 2, chunk_size=0)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = LinearAttentionWithMemory(8, 2, 0.0, chunk_size=4)
    x = torch.randn(2, 10, 8, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    kept = m.memory
    g = torch.autograd.grad(out.square().sum(), [x, m.W_q.weight])
    m.reset_memory()
    ref = m(x)
    g_ref = torch.autograd.grad(ref.square().sum(), [x, m.W_q.weight])
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(kept, m.memory, atol=2e-6, rtol=2e-6)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)
