"""Self-modifying layers: the batch rule against the reference library's formula, the sequence
rule against a token loop, attention causality and caches, L2-regression attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nested_learning as nl
from nested_learning.models import L2RegressionAttention, SelfModifyingAttention, SelfModifyingLinear, SelfModifyingTitan
from nested_learning.ops import _library

BACKENDS = ["reference"] + (["cpp"] if nl.HAS_EXT else [])


def _reference_library_update(w: torch.Tensor, x: torch.Tensor, lr: float, normalized: bool) -> torch.Tensor | None:
    """The reference library's queued ΔW, written out as it computes it."""
    x_avg = x.reshape(-1, x.shape[-1]).mean(dim=0)
    norm_sq = (x_avg**2).sum()
    if not norm_sq > 1e-8:
        return None
    outer = torch.outer(w @ x_avg, x_avg)
    return outer / (norm_sq + 1e-8) * lr if normalized else outer * lr


@pytest.mark.parametrize("normalized", [True, False])
def test_batch_rule_is_bit_compatible_with_the_reference_library(normalized):
    torch.manual_seed(0)
    layer = SelfModifyingLinear(6, 4, self_mod_lr=0.3, normalized=normalized)
    x = torch.randn(3, 5, 6)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    assert torch.equal(y, F.linear(x, w0, layer.bias))  # output from the pre-update weight
    assert torch.equal(layer.weight, w0)  # queued, not applied
    expected = _reference_library_update(w0, x, 0.3, normalized)
    layer.apply_pending_updates()
    assert torch.equal(layer.weight, (w0 - expected).clamp(-10, 10))
    assert layer.update_count.item() == 1 and layer.pending_update is None


def test_immediate_update_and_clamp():
    layer = SelfModifyingLinear(3, 2, self_mod_lr=0.5, immediate_update=True)
    with torch.no_grad():
        layer.weight.fill_(9.9)
    w0 = layer.weight.detach().clone()
    x = -torch.ones(4, 3)
    layer(x)
    assert torch.equal(layer.weight, (w0 - _reference_library_update(w0, x, 0.5, True)).clamp(-10, 10))
    assert layer.weight.max() <= 10 and layer.pending_update is None


def test_zero_mean_input_skips_the_update():
    layer = SelfModifyingLinear(3, 2)
    w0 = layer.weight.detach().clone()
    layer(torch.zeros(2, 4, 3))
    layer.apply_pending_updates()
    assert torch.equal(layer.weight, w0) and layer.update_count.item() == 0


def test_queued_updates_stay_one_buffer_and_sum():
    torch.manual_seed(1)
    layer = SelfModifyingLinear(5, 5, self_mod_lr=0.05)
    w0 = layer.weight.detach().clone()
    xs = [torch.randn(2, 3, 5) for _ in range(40)]
    for x in xs:
        layer(x)
    assert layer.num_pending_updates == 40 and layer.pending_update.shape == (5, 5)  # no growth
    buffers = [b for b in layer.buffers() if b is not None]
    assert sum(b.numel() for b in buffers) == 1 + 25
    expected = w0.clone()
    for x in xs:  # the reference library subtracts the queue in order; each ΔW from w0
        expected -= _reference_library_update(w0, x, 0.05, True)
    layer.apply_pending_updates()
    torch.testing.assert_close(layer.weight.detach(), expected.clamp(-10, 10), rtol=1e-6, atol=1e-7)


def _sequence_oracle(w, b, x, v, lr, normalized):
    """W_t = W_{t−1} − β_t (W_{t−1} x_t − v_t) x_tᵀ; y_t = W_t x_t + b, token by token."""
    outs = []
    for bi in range(x.shape[0]):
        wt, ys = w, []
        for t in range(x.shape[1]):
            xt = x[bi, t]
            beta = lr / (1 + lr * xt.dot(xt)) if normalized else lr
            wt = wt - beta * torch.outer(wt @ xt - v[bi, t], xt)
            ys.append(wt @ xt + b)
        outs.append(torch.stack(ys))
    return torch.stack(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalized", [True, False])
def test_sequence_rule_equals_the_token_loop_with_gradients(backend, normalized):
    torch.manual_seed(2)
    layer = SelfModifyingLinear(7, 5, self_mod_lr=0.2, normalized=normalized, mode="sequence").double()
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    x = torch.randn(2, 9, 7, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    with _library.use_backend(backend):
        y = layer(x, target=v)
    expected = _sequence_oracle(layer.weight, layer.bias, x, v, 0.2, normalized)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, v, layer.weight, layer.bias), dy)
    want = torch.autograd.grad(expected, (x, v, layer.weight, layer.bias), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_sequence_rule_without_target_decays_and_two_dim_input_is_one_sequence():
    torch.manual_seed(3)
    layer = SelfModifyingLinear(4, 3, self_mod_lr=0.5, mode="sequence")
    x = torch.randn(6, 4)
    y = layer(x)
    expected = _sequence_oracle(layer.weight, layer.bias, x[None], torch.zeros(1, 6, 3), 0.5, True)[0]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer(x, update_weights=False), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda l: l(torch.randn(2, 3, 5)), ValueError, "x must have shape"),
        (lambda l: l(torch.ones(2, 4, dtype=torch.long)), TypeError, "x must be a floating"),
        (lambda l: l(torch.randn(2, 4), target=torch.randn(2, 3)), ValueError, "mode='sequence'"),
    ],
)
def test_bad_input_names_the_argument_and_changes_nothing(call, error, message):
    layer = SelfModifyingLinear(4, 3)
    w0 = layer.weight.detach().clone()
    with pytest.raises(error, match=message):
        call(layer)
    assert torch.equal(layer.weight, w0) and layer.pending_update is None and layer.update_count.item() == 0


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="mode"):
        SelfModifyingLinear(3, 3, mode="token")
    with pytest.raises(ValueError, match="in_features"):
        SelfModifyingLinear(0, 3)
    with pytest.raises(ValueError, match="self_mod_lr"):
        SelfModifyingLinear(3, 3, self_mod_lr=float("nan"))
    with pytest.raises(ValueError, match="num_heads"):
        SelfModifyingAttention(10, num_heads=3)


def test_attention_is_causal_softmax_attention_and_queues_four_updates():
    torch.manual_seed(4)
    attn = SelfModifyingAttention(8, num_heads=2, dropout=0.0).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    y = attn(x)
    q, k, v = (F.linear(x, w.weight).view(2, 6, 2, 4).transpose(1, 2) for w in (attn.W_q, attn.W_k, attn.W_v))
    scores = q @ k.transpose(-1, -2) / 2.0 + torch.full((6, 6), float("-inf"), dtype=torch.float64).triu(1)
    o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 8)
    torch.testing.assert_close(y, F.linear(o, attn.W_o.weight), rtol=1e-12, atol=1e-12)
    assert [w.num_pending_updates for w in (attn.W_q, attn.W_k, attn.W_v, attn.W_o)] == [1, 1, 1, 1]
    x2 = x.clone()
    x2[:, 4] += 1.0
    y2 = attn(x2)
    assert torch.equal(y[:, :4], y2[:, :4]) and not torch.allclose(y[:, 4:], y2[:, 4:])


def test_attention_cache_continues_the_sequence():
    torch.manual_seed(5)
    attn = SelfModifyingAttention(8, num_heads=2, dropout=0.0)
    x = torch.randn(2, 7, 8)
    full = attn(x, enable_self_modification=False)
    a, cache = attn(x[:, :3], False, return_cache=True)
    b, cache = attn(x[:, 3:4], False, cache=cache, return_cache=True)
    c = attn(x[:, 4:], False, cache=cache)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-5, atol=1e-6)


def test_titan_returns_output_and_hidden_and_counts_updates():
    torch.manual_seed(6)
    titan = SelfModifyingTitan(6, 10, 4, num_layers=2, dropout=0.0)
    out, hidden = titan(torch.randn(3, 5, 6))
    assert out.shape == (3, 5, 4) and hidden.shape == (2, 3, 10)
    assert titan.get_update_stats() == {"input_proj_updates": 1.0, "output_proj_updates": 1.0}
    w0 = titan.input_proj.weight.detach().clone()
    titan.apply_pending_updates()
    assert not torch.equal(titan.input_proj.weight, w0)
    lstm = SelfModifyingTitan(6, 10, 4, use_gru=False)
    assert isinstance(lstm(torch.randn(1, 2, 6))[1], tuple)


def _l2_oracle(q, k, v, lr):
    """Per sequence and head: M ← M + β (v_t − M k_t) k_tᵀ, o_t = M q_t."""
    B, T, H, D = q.shape
    out = torch.zeros_like(v)
    for b in range(B):
        for h in range(H):
            m = torch.zeros(D, D, dtype=q.dtype)
            for t in range(T):
                m = m + lr * torch.outer(v[b, t, h] - m @ k[b, t, h], k[b, t, h])
                out[b, t, h] = m @ q[b, t, h]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_regression_attention_is_a_per_sequence_delta_rule(backend):
    torch.manual_seed(7)
    attn = L2RegressionAttention(8, num_heads=2, memory_lr=0.3, dropout=0.0).double()
    with torch.no_grad():
        for w in (attn.W_q, attn.W_k, attn.W_v, attn.W_o):
            w.weight.normal_(std=0.3)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with _library.use_backend(backend):
        y = attn(x, enable_self_modification=False)
    q, k, v = (F.linear(x, w.weight).view(3, 5, 2, 4) for w in (attn.W_q, attn.W_k, attn.W_v))
    expected = F.linear(_l2_oracle(q, k, v, 0.3).reshape(3, 5, 8), attn.W_o.weight)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    y.square().sum().backward()
    assert all(w.weight.grad is not None and w.weight.grad.abs().sum() > 0 for w in (attn.W_k, attn.W_v))
    # the memory is per sequence and per call: another batch element or call changes nothing
    x2 = x.clone()
    x2[1] = torch.randn(5, 8, dtype=torch.float64)
    with _library.use_backend(backend):
        torch.testing.assert_close(attn(x2, False)[0], y[0].detach(), rtol=1e-12, atol=1e-13)
