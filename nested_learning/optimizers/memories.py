"""The learned momentum memories of DeepMomentumGD: MemoryMLP, FactorizedMemoryMLP, SharedMemoryPool.

A memory maps a gradient block and its momentum block (S coordinates each) to an update block
of S coordinates. Layer names, initialisation and state-dict keys are the reference library's,
so its memory checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..reference.memory_mlp_momentum import to_blocks
from . import _hyper
from ._blocks import bucket_for, check_bucket_sizes

__all__ = ["MemoryMLP", "FactorizedMemoryMLP", "SharedMemoryPool"]


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    """Linear(in→h) → LayerNorm → SiLU, repeated depth−1 times (h→h after the first), then Linear(→out)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(depth - 1):
        layers += [nn.Linear(dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.SiLU()]
        dim = hidden_dim
    return nn.Sequential(*layers, nn.Linear(dim, out_dim))


def _init_linears(module: nn.Module, last: nn.Linear) -> None:
    """xavier_uniform(gain 0.1) and zero bias for every Linear, then gain 0.01 for ``last``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=0.1)
            nn.init.zeros_(m.bias)
    nn.init.xavier_uniform_(last.weight, gain=0.01)


class MemoryMLP(nn.Module):
    """o = MLP([g ; m]) on rows of S = ``param_dim`` coordinates (depth 2:
    Linear(2S→h) → LayerNorm(h) → SiLU → Linear(h→S)); the input is g alone without
    ``use_context`` or momentum. A fresh memory outputs about 1e-3·‖g‖ (small init, as in the
    reference library, whose docstring calls it identity-like: it is not)."""

    def __init__(self, param_dim: int, hidden_dim: int = 64, depth: int = 2, use_context: bool = True):
        super().__init__()
        self.param_dim = _hyper.positive_int("param_dim", param_dim)
        _hyper.positive_int("hidden_dim", hidden_dim)
        self.use_context = use_context
        self.network = _mlp(2 * param_dim if use_context else param_dim, hidden_dim, param_dim, _hyper.positive_int("depth", depth))
        _init_linears(self, self.network[-1])

    def forward(self, grad: Tensor, momentum: Optional[Tensor] = None) -> Tensor:
        x = torch.cat([grad, momentum], dim=-1) if self.use_context and momentum is not None else grad
        return self.network(x)

    def fused_weights(self) -> Optional[list[Tensor]]:
        """(W1, b1, γ, β, W2, b2) when this memory is the shape the fused op computes (depth 2
        with context), else None."""
        net = self.network
        if not self.use_context or len(net) != 4 or net[1].eps != 1e-5 or not net[1].elementwise_affine:
            return None
        return [net[0].weight, net[0].bias, net[1].weight, net[1].bias, net[3].weight, net[3].bias]


class FactorizedMemoryMLP(nn.Module):
    """o = up(core([down_g g ; down_m m])): low-rank memory (rank r) for large S; the core is
    Linear(2r→h) → LayerNorm → SiLU → Linear(h→r) at depth 2."""

    def __init__(self, param_dim: int, hidden_dim: int = 64, rank: int = 16, depth: int = 2, use_context: bool = True):
        super().__init__()
        self.param_dim = _hyper.positive_int("param_dim", param_dim)
        self.rank = _hyper.positive_int("rank", rank)
        _hyper.positive_int("hidden_dim", hidden_dim)
        self.use_context = use_context
        if use_context:
            self.down_proj_grad = nn.Linear(param_dim, rank)
            self.down_proj_mom = nn.Linear(param_dim, rank)
        else:
            self.down_proj = nn.Linear(param_dim, rank)
        self.core = _mlp(2 * rank if use_context else rank, hidden_dim, rank, _hyper.positive_int("depth", depth))
        self.up_proj = nn.Linear(rank, param_dim)
        _init_linears(self, self.up_proj)

    def forward(self, grad: Tensor, momentum: Optional[Tensor] = None) -> Tensor:
        if self.use_context and momentum is not None:
            low = torch.cat([self.down_proj_grad(grad), self.down_proj_mom(momentum)], dim=-1)
        else:
            low = (self.down_proj_grad if self.use_context else self.down_proj)(grad)
        return self.up_proj(self.core(low))

    def fused_weights(self) -> None:
        return None


class SharedMemoryPool(nn.Module):
    """One memory per bucket size S, shared by every tensor of that bucket (``memories[str(S)]``).

    ``forward(grad, momentum, n)`` runs a tensor's n coordinates through its bucket's memory
    block by block and returns n outputs. The reference library instead feeds only the first S
    coordinates and returns S outputs for tensors larger than the largest bucket."""

    def __init__(
        self,
        bucket_sizes: Optional[Sequence[int]] = (64, 256, 1024, 4096),
        hidden_dim: int = 64,
        depth: int = 2,
        use_factorized: bool = False,
        factorized_rank: int = 16,
        factorize_threshold: int = 1024,
    ):
        super().__init__()
        self.bucket_sizes = list(check_bucket_sizes(bucket_sizes))
        self.use_factorized = use_factorized
        self.factorize_threshold = factorize_threshold
        self.memories = nn.ModuleDict()
        for size in self.bucket_sizes:
            if use_factorized and size >= factorize_threshold:
                self.memories[str(size)] = FactorizedMemoryMLP(size, hidden_dim, factorized_rank, depth)
            else:
                self.memories[str(size)] = MemoryMLP(size, hidden_dim, depth)

    def get_bucket(self, param_numel: int) -> int:
        return bucket_for(param_numel, self.bucket_sizes)

    def get_memory(self, param_numel: int) -> nn.Module:
        return self.memories[str(self.get_bucket(param_numel))]

    def forward(self, grad: Tensor, momentum: Tensor, param_numel: int) -> Tensor:
        size = self.get_bucket(param_numel)
        out = self.memories[str(size)](to_blocks(grad.flatten(), size), to_blocks(momentum.flatten(), size))
        return out.flatten()[:param_numel]
