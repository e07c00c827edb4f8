"""AssociativeMemory, LinearAttention and DeltaRuleMemory against hand-written token loops
(float64, outputs and gradients), causality, carried state, slot mode and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nested_learning.memory import AssociativeMemory, DeltaRuleMemory, LinearAttention
from nested_learning.memory.associative import causal_linear_attention

F64 = torch.float64


def _randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def _grads(out, inputs, seed=1):
    cot = _randn(*out.shape, seed=seed, dtype=out.dtype)
    return torch.autograd.grad((out * cot).sum(), inputs)


def _assert_all_close(a, b, atol=1e-10, rtol=1e-10):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- token-loop oracles


def loop_linear_attention(la: LinearAttention, x, memory=None):
    """The reference library's recurrence: M_t = M_{t−1} + v_t k_tᵀ ([B, dv, dk]), y_t = M_t q_t,
    optionally / (Σ|M_t| |q_t| + 1e-6), then W_o."""
    q, k, v = la.W_q(x), la.W_k(x), la.W_v(x)
    m = torch.zeros(x.shape[0], la.dim_value, la.dim_key, dtype=x.dtype) if memory is None else memory
    ys = []
    for t in range(x.shape[1]):
        m = m + v[:, t, :, None] * k[:, t, None, :]
        y = (m * q[:, t, None, :]).sum(-1)
        if la.normalize:
            y = y / ((m.abs() * q[:, t, None, :].abs()).sum((-1, -2)) + 1e-6)[:, None]
        ys.append(y)
    return la.W_o(torch.stack(ys, 1)), m


def loop_delta_rule(keys, values, queries, lr, memory=None):
    """Per sequence: M_t = M_{t−1} + lr (v_t − M_{t−1} k_t) k_tᵀ, y_t = M_t q_t."""
    B, T, dk = keys.shape
    m = torch.zeros(B, values.shape[-1], dk, dtype=keys.dtype) if memory is None else memory
    ys = []
    for t in range(T):
        err = values[:, t] - (m @ keys[:, t, :, None]).squeeze(-1)
        m = m + lr * err[:, :, None] * keys[:, t, None, :]
        ys.append((m @ queries[:, t, :, None]).squeeze(-1))
    return torch.stack(ys, 1), m


def _linear_attention(seed=0, **kw) -> LinearAttention:
    torch.manual_seed(seed)
    return LinearAttention(6, 4, 5, **kw).double()


# ----------------------------------------------------------------------------- causal_linear_attention


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 16])
def test_causal_linear_attention_equals_token_loop(chunk_size):
    q, k = _randn(2, 3, 10, 4, seed=0), _randn(2, 3, 10, 4, seed=1)
    v, s0 = _randn(2, 3, 10, 5, seed=2), _randn(2, 3, 4, 5, seed=3)
    leaves = [t.requires_grad_() for t in (q, k, v, s0)]
    o, final = causal_linear_attention(q, k, v, s0, chunk_size)
    s, outs = s0, []
    for t in range(10):
        s = s + k[..., t, :, None] * v[..., t, None, :]
        outs.append((s * q[..., t, :, None]).sum(-2))
    ref = torch.stack(outs, -2)
    _assert_all_close((o, final), (ref, s))
    _assert_all_close(_grads(o, leaves), _grads(ref, leaves))


# ----------------------------------------------------------------------------- LinearAttention


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("chunk_size", [4, 5, 64])
def test_linear_attention_equals_reference_loop_with_gradients(normalize, chunk_size):
    la = _linear_attention(normalize=normalize, chunk_size=chunk_size)
    x = _randn(3, 13, 6).requires_grad_()
    out, memory = la(x, return_memory=True)
    ref, ref_memory = loop_linear_attention(la, x)
    _assert_all_close((out, memory), (ref, ref_memory))
    leaves = [x, *la.parameters()]
    _assert_all_close(_grads(out, leaves), _grads(ref, leaves))


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention_float32_is_close_to_float64(normalize):
    la = _linear_attention(normalize=normalize, chunk_size=8)
    x = _randn(2, 37, 6)
    ref, _ = loop_linear_attention(la, x)
    out = la.float()(x.float())
    rel = (out.double() - ref).abs().max() / ref.abs().max()
    assert out.dtype == torch.float32 and rel < 5e-6


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention_is_causal(normalize):
    la = _linear_attention(normalize=normalize, chunk_size=4)
    x = _randn(2, 11, 6)
    for t in (0, 3, 6, 10):
        x2 = x.clone()
        x2[:, t] += 3.0
        y, y2 = la(x), la(x2)
        assert torch.equal(y[:, :t], y2[:, :t])
        assert not torch.allclose(y[:, t], y2[:, t])


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention_carried_state_equals_one_call(normalize):
    la = _linear_attention(normalize=normalize, chunk_size=4)
    x = _randn(2, 14, 6)
    whole, memory = la(x, return_memory=True)
    la.set_persistent_memory(2, dtype=F64)
    first = la(x[:, :6])
    assert not la._persistent_memory.requires_grad
    second, second_memory = la(x[:, 6:], return_memory=True)
    _assert_all_close((torch.cat([first, second], 1), second_memory), (whole, memory))
    # reset (argument and method) restarts from zero
    _assert_all_close((la(x[:, 6:], reset_memory=True),), (loop_linear_attention(la, x[:, 6:])[0],))
    la.reset_memory()
    assert torch.count_nonzero(la._persistent_memory) == 0
    _assert_all_close((second_memory,), (memory,))  # a returned memory survives the resets


def test_linear_attention_persistent_batch_mismatch_starts_fresh_like_the_reference():
    la = _linear_attention(chunk_size=4)
    la.set_persistent_memory(3, dtype=F64)
    x = _randn(2, 5, 6)
    _assert_all_close((la(x),), (loop_linear_attention(la, x)[0],))
    assert la._persistent_memory.shape == (2, 5, 4)


def test_linear_attention_defaults_mirror_the_reference():
    la = LinearAttention(8)
    assert (la.dim_key, la.dim_value, la.normalize) == (8, 8, False)
    assert all(m.bias is None for m in (la.W_q, la.W_k, la.W_v, la.W_o))
    assert la._persistent_memory is None and la(torch.randn(1, 3, 8)).shape == (1, 3, 8)


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention_saves_no_per_token_states(normalize):
    """What backward keeps grows like T/C·dk·dv + T·C, never T·dk·dv (the reference's loop)."""
    torch.manual_seed(0)
    la = LinearAttention(64, normalize=normalize, chunk_size=16)
    x = torch.randn(1, 256, 64, requires_grad=True)
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.shape)] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        la(x).sum().backward()
    per_token_states = 256 * 64 * 64
    assert sum(saved.values()) < per_token_states / 3


def test_linear_attention_bad_input_raises_before_touching_state():
    la = _linear_attention()
    la.set_persistent_memory(2, dtype=F64)
    la(_randn(2, 3, 6))
    before = la._persistent_memory.clone()
    with pytest.raises(ValueError, match="x must have shape"):
        la(_randn(2, 3, 5), reset_memory=True)
    with pytest.raises(ValueError, match="x must have shape"):
        la(_randn(2, 6), reset_memory=True)
    with pytest.raises(TypeError, match="x must be a floating"):
        la(torch.ones(2, 3, 6, dtype=torch.long), reset_memory=True)
    with pytest.raises(TypeError, match="x must have the dtype"):
        la(torch.ones(2, 3, 6, dtype=torch.float32), reset_memory=True)
    with pytest.raises(ValueError, match="x must have batch and sequence length"):
        la(_randn(2, 0, 6), reset_memory=True)
    assert torch.equal(la._persistent_memory, before)
    with pytest.raises(ValueError, match="chunk_size"):
        LinearAttention(4, chunk_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        la.set_persistent_memory(0)


# ----------------------------------------------------------------------------- DeltaRuleMemory


def _delta_inputs(B=3, T=13, dk=4, dv=5, dtype=F64):
    keys = F.normalize(_randn(B, T, dk, seed=0), dim=-1).to(dtype)
    return keys, _randn(B, T, dv, seed=1, dtype=dtype), _randn(B, T, dk, seed=2, dtype=dtype)


def test_delta_rule_memory_equals_per_sequence_token_loop_with_gradients():
    mem = DeltaRuleMemory(4, 5, learning_rate=0.7)
    leaves = [t.requires_grad_() for t in _delta_inputs()]
    out, memory = mem(*leaves, return_memory=True)
    ref, ref_memory = loop_delta_rule(*leaves, 0.7)
    _assert_all_close((out, memory), (ref, ref_memory))
    _assert_all_close(_grads(out, leaves), _grads(ref, leaves))


def test_delta_rule_memory_float32_and_unnormalised_keys():
    keys, values, queries = _delta_inputs(T=40)
    keys = keys * 1.2
    ref, _ = loop_delta_rule(keys, values, queries, 0.5)
    out = DeltaRuleMemory(4, 5, 0.5)(keys.float(), values.float(), queries.float())
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() / ref.abs().max() < 5e-6


def test_delta_rule_memory_sequences_are_independent_and_causal():
    mem = DeltaRuleMemory(4, 5)
    keys, values, queries = _delta_inputs()
    out = mem(keys, values, queries)
    values2 = values.clone()
    values2[1:, 4] += 1.0
    out2 = mem(keys, values2, queries)
    torch.testing.assert_close(out2[0], out[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out2[1:, :4], out[1:, :4], atol=1e-12, rtol=0)
    assert not torch.allclose(out2[1:, 4], out[1:, 4])


def test_delta_rule_memory_carried_state_equals_one_call():
    mem = DeltaRuleMemory(4, 5, 0.4)
    keys, values, queries = _delta_inputs()
    whole = mem(keys, values, queries)
    again = mem(keys, values, queries)
    _assert_all_close((again,), (whole,))  # no state carried unless asked
    mem.set_persistent_memory(3, dtype=F64)
    first = mem(keys[:, :5], values[:, :5], queries[:, :5])
    second, memory = mem(keys[:, 5:], values[:, 5:], queries[:, 5:], return_memory=True)
    _assert_all_close((torch.cat([first, second], 1), memory), (whole, loop_delta_rule(keys, values, queries, 0.4)[1]))
    fresh = mem(keys[:, 5:], values[:, 5:], queries[:, 5:], reset_memory=True)
    _assert_all_close((fresh,), (loop_delta_rule(keys[:, 5:], values[:, 5:], queries[:, 5:], 0.4)[0],))


def test_delta_rule_memory_bad_input_raises_before_touching_state():
    mem = DeltaRuleMemory(4, 5)
    keys, values, queries = _delta_inputs()
    mem.set_persistent_memory(3, dtype=F64)
    mem(keys, values, queries)
    before = mem._persistent_memory.clone()
    with pytest.raises(ValueError, match="values must have shape"):
        mem(keys, values[..., :4], queries, reset_memory=True)
    with pytest.raises(ValueError, match="share \\[B, T\\]"):
        mem(keys, values[:, :5], queries, reset_memory=True)
    with pytest.raises(TypeError, match="queries must have the dtype of keys"):
        mem(keys, values, queries.float(), reset_memory=True)
    with pytest.raises(TypeError, match="keys must be a floating"):
        mem(keys.long(), values, queries, reset_memory=True)
    mem.learning_rate = 3.0
    with pytest.raises(ValueError, match="learning_rate"):
        mem(keys, values, queries, reset_memory=True)
    assert torch.equal(mem._persistent_memory, before)
    with pytest.raises(ValueError, match="learning_rate"):
        DeltaRuleMemory(4, 5, learning_rate=-0.1)


# ----------------------------------------------------------------------------- AssociativeMemory


def test_matrix_memory_stores_and_retrieves_with_gradients_within_a_call():
    mem = AssociativeMemory(4, 3).double()
    keys, values, query = _randn(5, 4, seed=0), _randn(5, 3, seed=1), _randn(2, 7, 4, seed=2)
    mem.store(keys, values)
    torch.testing.assert_close(mem.memory, values.T @ keys, atol=1e-12, rtol=0)
    torch.testing.assert_close(mem.retrieve(query), query @ (values.T @ keys).T, atol=1e-12, rtol=0)
    k2, v2 = _randn(3, 4, seed=3).requires_grad_(), _randn(3, 3, seed=4).requires_grad_()
    out = mem(query, k2, v2)
    expected = query @ (values.T @ keys + v2.T @ k2).T
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    _assert_all_close(_grads(out, [k2, v2]), _grads(expected, [k2, v2]))
    assert not mem.memory.requires_grad
    mem(query, k2, v2).sum().backward()  # a second call builds no graph through the first
    torch.testing.assert_close(mem(query, store=False), query @ mem.memory.T)


def _ring_oracle(m, batches):
    """The reference library's FIFO, one pair at a time."""
    keys, ptr = [None] * m, 0
    for batch in batches:
        for row in batch:
            keys[ptr], ptr = row, (ptr + 1) % m
    return keys, ptr


def test_slot_memory_is_a_fifo_ring_that_keeps_the_last_pairs_on_overflow():
    mem = AssociativeMemory(2, 1, memory_size=4).double()
    batches = [_randn(n, 2, seed=n) for n in (3, 2, 9, 4, 1)]
    for i, batch in enumerate(batches):
        mem.store(batch, batch[:, :1] * 10)
        slots, ptr = _ring_oracle(4, batches[: i + 1])
        assert int(mem.memory_ptr) == ptr
        for s, row in enumerate(slots):
            if row is not None:
                torch.testing.assert_close(mem.keys[s], row)
                torch.testing.assert_close(mem.values[s], row[:1] * 10)


@pytest.mark.parametrize("objective", ["dot_product", "l2", "cosine"])
def test_slot_memory_retrieves_by_softmax_over_every_slot(objective):
    mem = AssociativeMemory(4, 3, objective=objective, memory_size=5).double()
    keys, values, query = _randn(3, 4, seed=0), _randn(3, 3, seed=1), _randn(2, 6, 4, seed=2)
    mem.store(keys, values)
    slots_k = torch.cat([keys, torch.zeros(2, 4, dtype=F64)])  # empty slots take part
    slots_v = torch.cat([values, torch.zeros(2, 3, dtype=F64)])
    if objective == "dot_product":
        sim = query @ slots_k.T
    elif objective == "cosine":
        sim = F.cosine_similarity(query[..., None, :], slots_k, dim=-1, eps=1e-12)
    else:
        sim = -(query[..., None, :] - slots_k).norm(dim=-1)
    torch.testing.assert_close(mem.retrieve(query), torch.softmax(sim, -1) @ slots_v, atol=1e-12, rtol=0)
    torch.testing.assert_close(mem.retrieve(query[0, 0]), mem.retrieve(query)[0, 0])


def test_slot_memory_forward_is_differentiable_in_the_stored_pairs():
    mem = AssociativeMemory(4, 3, memory_size=3).double()
    keys, values = _randn(5, 4, seed=0).requires_grad_(), _randn(5, 3, seed=1).requires_grad_()
    query = _randn(2, 4, seed=2)
    out = mem(query, keys, values)
    expected = torch.softmax(query @ keys[2:].T, -1) @ values[2:]  # slots 2, 0, 1 hold pairs 2, 3, 4
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    _assert_all_close(_grads(out, [keys, values]), _grads(expected, [keys, values]))
    assert not mem.keys.requires_grad and int(mem.memory_ptr) == 2


def test_associative_memory_bad_input_raises_before_touching_state():
    with pytest.raises(ValueError, match="objective"):
        AssociativeMemory(4, 3, objective="hamming")
    with pytest.raises(ValueError, match="memory_size"):
        AssociativeMemory(4, 3, memory_size=0)
    for memory_size in (None, 4):
        mem = AssociativeMemory(4, 3, memory_size=memory_size)
        mem.store(torch.randn(2, 4), torch.randn(2, 3))
        before = {n: b.clone() for n, b in mem.named_buffers()}
        with pytest.raises(ValueError, match="keys must have shape"):
            mem.store(torch.randn(2, 5), torch.randn(2, 3))
        with pytest.raises(ValueError, match="keys must have shape"):
            mem.store(torch.randn(1, 2, 4), torch.randn(1, 2, 3))
        with pytest.raises(ValueError, match="same number of pairs"):
            mem(torch.randn(4), torch.randn(2, 4), torch.randn(3, 3))
        with pytest.raises(ValueError, match="given together"):
            mem(torch.randn(4), torch.randn(2, 4))
        with pytest.raises(ValueError, match="query must have shape"):
            mem(torch.randn(3), torch.randn(2, 4), torch.randn(2, 3))
        with pytest.raises(TypeError, match="values must have the dtype"):
            mem.store(torch.randn(2, 4), torch.randn(2, 3, dtype=F64))
        with pytest.raises(TypeError, match="query must be a floating"):
            mem.retrieve(torch.ones(4, dtype=torch.long))
        for n, b in mem.named_buffers():
            assert torch.equal(b, before[n])
