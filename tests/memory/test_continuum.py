"""ContinuumMemorySystem: variants, defaults, in-context levels, the manual window API, state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nested_learning as nl
from nested_learning.memory import ContinuumMLP, FullyNestedCMS
from nested_learning.reference import cms_chunk_update as ref


def _cms(**kw) -> nl.ContinuumMemorySystem:
    torch.manual_seed(0)
    return nl.ContinuumMemorySystem(8, 16, **kw)


def test_defaults_mirror_the_reference_library():
    cms = nl.ContinuumMemorySystem(32)
    assert cms.hidden_dim == 128 and cms.chunk_sizes == [8, 16, 32] and cms.variant == "sequential"
    assert torch.allclose(cms.level_weights, torch.full((3,), 1 / 3))
    level = cms.mlps[0]
    assert torch.count_nonzero(level.fc1.bias) == 0 and torch.count_nonzero(level.fc2.bias) == 0
    assert level.fc2.weight.abs().max() < level.fc1.weight.abs().max()  # gain 0.1


def test_variants_compute_their_equations():
    x = torch.randn(2, 5, 8)
    seq = _cms(num_levels=2, chunk_sizes=[1, 2])
    a = torch.softmax(seq.level_weights, 0)
    h1 = x + a[0] * seq.mlps[0](x)
    torch.testing.assert_close(seq(x), h1 + a[1] * seq.mlps[1](h1))
    torch.testing.assert_close(seq(x, use_residual=False), seq.mlps[1](seq.mlps[0](x)))
    nested = _cms(num_levels=2, chunk_sizes=[1, 2], variant="nested")
    h1 = x + nested.mlps[0](x)
    torch.testing.assert_close(nested(x), h1 + nested.mlps[1](h1))
    ind = _cms(num_levels=2, chunk_sizes=[1, 2], variant="independent")
    a = torch.softmax(ind.level_weights, 0)
    torch.testing.assert_close(ind(x), x + a[0] * ind.mlps[0](x) + a[1] * ind.mlps[1](x))
    hier = seq.forward_hierarchical(x)
    torch.testing.assert_close(hier[0], x + seq.mlps[0](x))


def test_fully_nested_is_a_cms_and_composes():
    cms = FullyNestedCMS(8, 16, num_levels=2, chunk_sizes=[2, 4])
    x = torch.randn(1, 3, 8)
    assert isinstance(cms, nl.ContinuumMemorySystem)
    torch.testing.assert_close(cms(x), cms.mlps[1](cms.mlps[0](x)))


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swish"])
def test_in_context_levels_run_the_fast_weight_op(activation):
    cms = _cms(num_levels=2, chunk_sizes=[4, 16], in_context=True, activation=activation, memory_lr=0.05)
    x = torch.randn(2, 21, 8, requires_grad=True)
    y = cms(x)
    a = torch.softmax(cms.level_weights, 0)
    h = x
    name = "silu" if activation == "swish" else activation
    for i in range(2):
        B = x.shape[0]
        w1 = cms.mlps[i].fc1.weight.expand(B, -1, -1)
        w2 = cms.mlps[i].fc2.weight.expand(B, -1, -1)
        o, _, _ = ref.chunked(h, cms.values[i](h), w1, w2, 0.05, cms.chunk_sizes[i], name)
        h = h + a[i] * o
    torch.testing.assert_close(y, h, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in cms.parameters())


def test_in_context_is_causal():
    cms = _cms(num_levels=2, chunk_sizes=[3, 8], in_context=True, memory_lr=0.1)
    x = torch.randn(1, 20, 8)
    y = cms(x)
    x2 = x.clone()
    x2[:, 12] += 1.0
    y2 = cms(x2)
    assert torch.equal(y[:, :12], y2[:, :12]) and not torch.equal(y[:, 12:], y2[:, 12:])


def test_manual_window_api_averages_like_the_reference_library():
    cms = _cms(num_levels=2, chunk_sizes=[1, 2])
    grads = []
    for _ in range(3):
        cms.zero_grad()
        cms(torch.randn(2, 3, 8)).sum().backward()
        grads.append(cms.mlps[1].fc1.weight.grad.clone())
        cms.accumulate_gradients(1)
    assert cms.get_level_stats()["levels"][1]["accumulated_steps"] == 3
    cms.apply_accumulated_gradients(1)
    torch.testing.assert_close(cms.mlps[1].fc1.weight.grad, sum(grads) / 3)
    assert cms.accumulated_counts[1] == 0 and torch.count_nonzero(cms.accumulators(1)[0]) == 0
    assert cms.get_update_levels(0) == [True, True] and cms.get_update_levels(3) == [True, False]


def test_state_dict_round_trips_windows_and_counters():
    cms = _cms(num_levels=2, chunk_sizes=[2, 4])
    cms(torch.randn(1, 2, 8)).sum().backward()
    cms.accumulate_gradients(0)
    cms.update_counts = [3, 1]
    clone = _cms(num_levels=2, chunk_sizes=[2, 4])
    clone.load_state_dict(cms.state_dict())
    assert clone.accumulated_counts == [1, 0] and clone.update_counts == [3, 1]
    assert all(torch.equal(a, b) for a, b in zip(clone.accumulators(0), cms.accumulators(0)))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_levels": 2, "chunk_sizes": [8]}, "chunk_sizes must have num_levels=2 entries"),
        ({"chunk_sizes": [8, 0, 4]}, "chunk_sizes must be positive integers"),
        ({"num_levels": 0}, "num_levels must be an integer >= 1"),
        ({"activation": "tanh"}, "activation must be one of"),
        ({"variant": "parallel"}, "variant must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        nl.ContinuumMemorySystem(8, **kwargs)
    cms = _cms()
    with pytest.raises(ValueError, match="level must be an integer in"):
        cms.accumulate_gradients(5)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        cms.get_update_levels(-1)


def test_biased_level_refuses_in_context_use():
    level = ContinuumMLP(4, 8)
    with pytest.raises(ValueError, match="bias-free"):
        level.in_context(torch.randn(1, 3, 4), torch.randn(1, 3, 4), 0.1, 2)
    assert torch.allclose(level.act(torch.tensor([1.0])), F.gelu(torch.tensor([1.0])))
