"""C++ CPU memory_mlp_momentum kernel (``nested_learning::memory_mlp_momentum_cpp``) against the
per-tensor reference ``reference.memory_mlp_momentum.step``.

Each case runs 20 steps of one group of tensors of odd sizes (0-d, 1 element, 0 elements, exactly S,
2S, not multiples of S, and one big enough that its full blocks are read in place, in two panels at
S = 64) through one bucket memory, feeding every output back: has_prev is mixed, every fourth step
runs without compute_grad, and the memory weights move by (clipped) SGD on the gradients each step
accumulated, so that every state evolves.

Accuracy rule (``nested_learning.testing``): the relative error of the final parameters, momenta,
last outputs and memory weights, of the weight gradients summed over the steps, of P and of every
step's loss, against the reference run on float64 copies, must stay within 2 × the larger error of
two PyTorch formulations run in the parameters' dtype (the per-tensor reference, and the same step
with every block in one batch) + the unit roundoff of the quantity's dtype (the parameters' dtype
for the parameters, float32 for the states). In float64 the kernel equals the reference to 1e-12.

The kernel runs on two threads (its panels split between them), one case also on one; PyTorch runs
on one thread.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import nested_learning  # noqa: F401  (loads nested_learning._C)
from nested_learning import testing
from nested_learning.reference import memory_mlp_momentum as reference

if not hasattr(torch.ops.nested_learning, "memory_mlp_momentum_cpp"):
    pytest.skip("nested_learning._C was built without the C++ memory_mlp_momentum kernel", allow_module_level=True)

STEPS = 20
MEMORY_LR = 0.05
BIG = (129, 257)  # 33153 elements: 518 full blocks at S = 64 (two in-place panels), 129 at S = 256 (one)


def _shapes(S: int) -> list[tuple[int, ...]]:
    return [(), (1,), (0,), (S,), (S - 3,), (5, 7), (3, 2 * S + 1), (S + 1,), (0, 3), BIG, (2, S)]


# name: (dtype, S, h, loss, weight_decay)
CASES = {
    "fp32-surrogate-S64-h16": (torch.float32, 64, 16, "surrogate", 0.01),
    "fp32-surrogate-S256-h64-no-decay": (torch.float32, 256, 64, "surrogate", 0.0),
    "fp32-l2-S64-h16": (torch.float32, 64, 16, "l2_regression", 0.01),
    "fp32-dot-S256-h64-no-decay": (torch.float32, 256, 64, "dot", 0.0),
    "bf16-surrogate-S64-h64": (torch.bfloat16, 64, 64, "surrogate", 0.01),
    "bf16-l2-S256-h16": (torch.bfloat16, 256, 16, "l2_regression", 0.0),
    "fp16-dot-S64-h16": (torch.float16, 64, 16, "dot", 0.01),
    "fp16-surrogate-S256-h64": (torch.float16, 256, 64, "surrogate", 0.0),
}
FP64_CASES = {
    "surrogate-S64-h16": (64, 16, "surrogate", 0.01),
    "l2-S64-h64": (64, 64, "l2_regression", 0.0),
    "dot-S256-h16": (256, 16, "dot", 0.01),
}


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def batched_step(params, grads, momenta, prev_outputs, has_prev, weights, weight_grads, projection, hyper) -> Tensor:
    """The reference's step with every block of every tensor in one forward and one backward (the
    same math, summed in another order: a second PyTorch formulation for the accuracy rule)."""
    size = weights[4].shape[0]
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    leaves = [w.detach().requires_grad_() for w in weights]
    start = projection.clone() if hyper.loss == "l2_regression" else None
    ct = weights[0].dtype
    gs = [grads[i].to(ct).flatten() + hyper.weight_decay * params[i].to(ct).flatten() for i in live]
    g_blocks = [reference.to_blocks(g, size) for g in gs]
    x = torch.cat([torch.cat(g_blocks), torch.cat([reference.to_blocks(momenta[i].flatten(), size) for i in live])], 1)
    with torch.enable_grad():
        pieces = reference.memory_forward(x, leaves, hyper.ln_eps).split([b.shape[0] for b in g_blocks])
        losses = []
        for i, g, gb, ob in zip(live, gs, g_blocks, pieces):
            o = ob.flatten()[: g.numel()]
            target = (gb @ start.T).flatten()[: g.numel()] if start is not None else None
            prev = prev_outputs[i].flatten() if has_prev[i] else None
            losses.append(reference.internal_loss(hyper.loss, o, g, prev, target))
            g_sq = g.pow(2).sum()
            if start is not None and g_sq > reference.NORM_EPS:
                error = reference.to_blocks(o.detach() - target, size)
                projection.add_(error.T @ gb, alpha=hyper.projection_lr / g_sq.item())
        total = torch.stack(losses).sum() * hyper.loss_scale if losses else weights[0].new_zeros(())
        if hyper.compute_grad and losses:
            for acc, d in zip(weight_grads, torch.autograd.grad(total, leaves)):
                acc.add_(d)
    for i, ob in zip(live, pieces):
        o = ob.detach().flatten()[: params[i].numel()].view_as(momenta[i])
        momenta[i].mul_(hyper.momentum).add_(o)
        params[i].copy_(params[i].to(momenta[i].dtype) - hyper.lr * momenta[i])
        prev_outputs[i].copy_(o)
    return total.detach()


def _memory(S: int, h: int, gen: torch.Generator) -> list[Tensor]:
    """(W1, b1, γ, β, W2, b2) at a trained-looking scale, in float64."""
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return [r(h, 2 * S) * (2 * S) ** -0.5, 0.1 * r(h), 1.0 + 0.1 * r(h), 0.1 * r(h), r(S, h) * h**-0.5, 0.05 * r(S)]


class Run:
    """One group of tensors and its memory, stepped by the C++ kernel or a PyTorch formulation."""

    def __init__(self, dtype: torch.dtype, S: int, h: int, loss: str, weight_decay: float, seed: int = 0,
                 threads: int = 2):
        gen = torch.Generator().manual_seed(seed)
        ct = torch.float64 if dtype == torch.float64 else torch.float32
        shapes = _shapes(S)
        r = lambda s, scale=1.0: (torch.randn(s, generator=gen, dtype=torch.float64) * scale)  # noqa: E731
        self.params = [r(s).to(dtype) for s in shapes]
        self.momenta = [r(s, 0.01).to(ct) for s in shapes]
        self.prev = [torch.zeros(s, dtype=ct) for s in shapes]
        self.weights = [w.to(ct) for w in _memory(S, h, gen)]
        self.weight_grads = [torch.zeros_like(w) for w in self.weights]
        self.grad_sums = [torch.zeros_like(w) for w in self.weights]  # over the steps
        self.projection = (0.1 * torch.eye(S, dtype=torch.float64) + r((S, S), 0.01)).to(ct)
        self.grads = [[self._grad(r(s), s).to(dtype) for s in shapes] for _ in range(STEPS)]
        self.loss, self.weight_decay, self.threads = loss, weight_decay, threads
        self.losses: list[Tensor] = []

    @staticmethod
    def _grad(x: Tensor, shape: tuple[int, ...]) -> Tensor:
        """0.1·N(0, 1); for one-coordinate tensors 0.2 + 0.1·|N(0, 1)| with a random sign: the surrogate's
        magnitude term varies as 1/‖g‖², and a ‖g‖ near 0 would let that one coordinate's rounding decide
        every quantity compared."""
        if x.numel() != 1:
            return 0.1 * x
        return (torch.where(x < 0, -1.0, 1.0) * (0.2 + 0.1 * x.abs())).reshape(shape)

    def step(self, i: int, backend: str) -> None:
        n = len(self.params)
        has_prev = [i > 0 and j % 3 != 1 for j in range(n)]
        hyper = reference.Hyper(lr=0.05, momentum=0.9, weight_decay=self.weight_decay, loss=self.loss, loss_scale=1 / n,
                                compute_grad=i % 4 != 2, projection_lr=0.05)
        for g in self.weight_grads:
            g.zero_()
        # the kernel on `threads` threads; PyTorch on one (many tiny GEMMs: a busy machine's second
        # core would only make them wait)
        torch.set_num_threads(self.threads if backend == "cpp" else 1)
        if backend == "batched":
            loss = batched_step(self.params, self.grads[i], self.momenta, self.prev, has_prev, self.weights,
                                self.weight_grads, self.projection, hyper)
        elif backend == "cpp":
            projection = self.projection if self.loss == "l2_regression" else self.weights[0].new_empty(0, 0)
            loss = torch.ops.nested_learning.memory_mlp_momentum_cpp(
                self.params, self.grads[i], self.momenta, self.prev, has_prev, self.weights, self.weight_grads,
                projection, hyper.lr, hyper.momentum, hyper.weight_decay, hyper.loss, hyper.loss_scale,
                hyper.compute_grad, hyper.projection_lr, hyper.ln_eps,
            )
        else:
            loss = reference.step(self.params, self.grads[i], self.momenta, self.prev, has_prev, self.weights,
                                  self.weight_grads, self.projection, hyper)
        assert loss.dtype == self.weights[0].dtype and loss.dim() == 0
        self.losses.append(loss.reshape(1))
        for acc, g in zip(self.grad_sums, self.weight_grads):
            acc.add_(g)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in self.weight_grads]))
        for w, g in zip(self.weights, self.weight_grads):  # SGD clipped to norm 1, as the optimizer clips
            w.sub_(MEMORY_LR * g / max(1.0, norm.item()))

    def run(self, backend: str) -> Run:
        for i in range(STEPS):
            self.step(i, backend)
        return self

    def tensors(self) -> dict[str, Tensor]:
        flat = lambda ts: torch.cat([t.reshape(-1).double() for t in ts])  # noqa: E731
        out = {"params": flat(self.params), "momenta": flat(self.momenta), "prev_outputs": flat(self.prev),
               "weights": flat(self.weights), "loss": flat(self.losses)}
        out.update({f"weight_grads[{k}]": g.double() for k, g in enumerate(self.grad_sums)})
        if self.loss == "l2_regression":
            out["projection"] = self.projection.double()
        return out


def _float64_copy(run: Run) -> Run:
    """The same inputs in float64 (16-bit parameters and gradients upcast as they are)."""
    exact = Run.__new__(Run)
    exact.__dict__.update(run.__dict__)
    up = lambda ts: [t.double() for t in ts]  # noqa: E731
    exact.params, exact.momenta, exact.prev = up(run.params), up(run.momenta), up(run.prev)
    exact.weights, exact.weight_grads, exact.grad_sums = up(run.weights), up(run.weight_grads), up(run.grad_sums)
    exact.projection, exact.grads, exact.losses = run.projection.double(), [up(g) for g in run.grads], []
    return exact


def _check(case: str, seed: int, threads: int) -> None:
    dtype, S, h, loss, wd = CASES[case]
    mine, ref, batched = (Run(dtype, S, h, loss, wd, seed, threads) for _ in range(3))
    truth = _float64_copy(ref).run("reference").tensors()
    assert all(torch.isfinite(t).all() for t in truth.values())
    got = mine.run("cpp").tensors()
    refs = [ref.run("reference").tensors(), batched.run("batched").tensors()]
    for name, t in refs[0].items():
        assert got[name].shape == t.shape and refs[1][name].shape == t.shape, name
    assert all(p.dtype == dtype for p in mine.params)
    # parameters with their dtype's unit roundoff as the floor, the states (compute dtype) with float32's
    states = [name for name in truth if name != "params"]
    verdicts = testing.judge({"params": got["params"]}, {"params": truth["params"]}, refs, dtype)
    verdicts += testing.judge({k: got[k] for k in states}, {k: truth[k] for k in states}, refs, torch.float32)
    failures = [v for v in verdicts if not v.passed]
    assert not failures, f"{case}, seed {seed}, {threads} thread(s): {failures}"


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference_over_20_steps(case, seed):
    _check(case, seed, threads=2)


@pytest.mark.parametrize("case", ["fp32-surrogate-S64-h16", "fp32-l2-S64-h16"])
def test_one_thread_matches_float64_reference(case):
    _check(case, 0, threads=1)


@pytest.mark.parametrize("case", list(FP64_CASES))
def test_float64_equals_reference(case):
    S, h, loss, wd = FP64_CASES[case]
    mine = Run(torch.float64, S, h, loss, wd).run("cpp").tensors()
    ref = Run(torch.float64, S, h, loss, wd).run("reference").tensors()
    assert all(torch.isfinite(t).all() for t in ref.values())
    for name, want in ref.items():
        assert testing.relative_error(mine[name], want) <= 1e-12, name


def test_compute_grad_false_leaves_gradients_and_empty_tensors_alone():
    run = Run(torch.float32, 64, 16, "surrogate", 0.01)
    sentinel = [torch.full_like(w, 7.0) for w in run.weights]
    empty = [i for i, p in enumerate(run.params) if p.numel() == 0]
    before = {name: [t.clone() for t in getattr(run, name)] for name in ("params", "momenta", "prev")}
    projection = run.weights[0].new_empty(0, 0)
    loss = torch.ops.nested_learning.memory_mlp_momentum_cpp(
        run.params, run.grads[0], run.momenta, run.prev, [True] * len(run.params), run.weights, sentinel, projection,
        0.05, 0.9, 0.01, "surrogate", 1.0, False, 0.01, 1e-5,
    )
    assert all(torch.equal(g, torch.full_like(g, 7.0)) for g in sentinel)
    assert torch.isfinite(loss)
    for name, old in before.items():
        new = getattr(run, name)
        assert all(new[i].shape == old[i].shape and new[i].numel() == 0 for i in empty)
        assert all(not torch.equal(new[i], old[i]) for i in range(len(new)) if i not in empty), name


def test_no_tensors_returns_zero_and_touches_nothing():
    run = Run(torch.float32, 64, 16, "l2_regression", 0.0)
    projection, grads = run.projection.clone(), [g.clone() for g in run.weight_grads]
    loss = torch.ops.nested_learning.memory_mlp_momentum_cpp(
        [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], [torch.zeros(0)], [False], run.weights, run.weight_grads,
        run.projection, 0.05, 0.9, 0.0, "l2_regression", 1.0, True, 0.01, 1e-5,
    )
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert torch.equal(run.projection, projection) and all(map(torch.equal, run.weight_grads, grads))


def test_bad_loss_is_an_error():
    run = Run(torch.float32, 64, 16, "dot", 0.0)
    with pytest.raises(RuntimeError, match="loss must be"):
        torch.ops.nested_learning.memory_mlp_momentum_cpp(
            run.params, run.grads[0], run.momenta, run.prev, [False] * len(run.params), run.weights,
            run.weight_grads, run.weights[0].new_empty(0, 0), 0.05, 0.9, 0.0, "cosine", 1.0, True, 0.01, 1e-5,
        )
