"""Temporal-kernel sequence memory (Farooq 2025, arXiv 2507.01052).

Stores a sequence ``xi_1 .. xi_N`` (normalised to norm ``sqrt(d)``) and retrieves it step by step.
At step ``m`` the state minimises

    E_m(s) = -(1/beta) log sum_k w_k(m) exp(beta <s, xi_k>)             (temporally weighted attention)
             - gamma max_k (<s, xi_k> + (1/beta) log w_k(m))             (max term: its zero-temperature limit)
             + ((1 + gamma)/2) ||s||^2                                    (quadratic regulariser)
             + lambda_f ||s - xi_m||^2                                    (fidelity)
             + mu ||s - s*_{m-1}||^2                                      (continuity)

with the normalised Gaussian kernel ``w_k(m) = exp(-(k-m)^2 / 2 sigma^2) / sum_j exp(-(j-m)^2 / 2 sigma^2)``,
starting from the previous retrieved state ``s*_{m-1}``. The regulariser's factor ``(1+gamma)/2``
makes a stored pattern a fixed point of the memory terms alone (as ``0.5 ||x||^2`` does for
Ramsauer et al.'s energy). The source paper is available here only as a summary; the exact
form of its max term and regulariser is our reading of Farooq 2025 (see docs/sequence_memory.md).

Two solvers minimise the same energy:

* ``"lbfgs"`` (faithful): ``scipy.optimize.minimize(method="L-BFGS-B", tol=1e-5)`` per step on the
  full kernel, as in the paper: ``O(N d)`` per evaluation, ``O(N^2 d)`` per sequence.
* ``"cccp"`` (ours): the first three terms are concave minus convex; linearising the concave part
  gives the closed-form step

      s <- (sum_k p_k xi_k + gamma xi_k* + 2 lambda_f xi_m + 2 mu s*_{m-1}) / (1 + gamma + 2 lambda_f + 2 mu)

  with ``p = softmax(beta <s, xi_k> + log w_k(m))`` and ``k*`` the max term's argmax, over the kernel
  truncated at ``truncate * sigma`` (``O(w d)`` per step). With ``batched=True`` all ``N`` steps are
  iterated together (Jacobi sweeps: step ``m`` reads the current ``s_{m-1}``), which converges to
  the sequential solution when each ``E_m`` has one minimiser (large ``lambda_f``); cost ``O(N w d)``
  per sweep, linear in ``N``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor, nn

from ..checks import positive_float, positive_int

__all__ = ["TemporalSequenceMemory", "SequenceRetrieval", "temporal_kernel", "log_kernel_row"]

SOLVERS = ("cccp", "lbfgs")


def temporal_kernel(num_patterns: int, sigma: float, *, dtype=torch.float64, device=None) -> Tensor:
    """Normalised Gaussian temporal kernel ``W[m, k] = w_k(m)`` ``(N, N)``; every row sums to one."""
    positive_int("num_patterns", num_patterns)
    if not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"sigma (kernel width) must be > 0, got {sigma!r}")
    idx = torch.arange(num_patterns, dtype=dtype, device=device)
    logits = -rearrange(idx, "k -> 1 k").sub(rearrange(idx, "m -> m 1")).square() / (2.0 * sigma**2)
    return torch.softmax(logits, dim=-1)


def log_kernel_row(num_patterns: int, m: int, sigma: float, *, dtype=torch.float64, device=None) -> Tensor:
    """``log w_k(m)`` for all ``k`` ``(N,)`` without building the ``N x N`` kernel."""
    logits = -(torch.arange(num_patterns, dtype=dtype, device=device) - m).square() / (2.0 * sigma**2)
    return logits - torch.logsumexp(logits, -1)


@dataclass
class SequenceRetrieval:
    """Result of a retrieval: states ``(N, d)`` and, when traced, the energies along it.

    Attributes:
        states: retrieved states ``s*_m`` ``(N, d)`` (normalised space).
        iterations: solver iterations per step (L-BFGS iterations or CCCP steps), or sweeps when batched.
        energy: ``E_m(s*_m)`` per step ``(N,)`` (full kernel), when ``trace=True``.
        trace: per step, the energies of the iterates (steps listed in ``trace_steps``).
    """

    states: Tensor
    iterations: list[int]
    energy: Tensor | None = None
    trace: dict[int, list[float]] = field(default_factory=dict)



class TemporalSequenceMemory(nn.Module):
    """A sequence memory retrieved by minimising the temporal-kernel energy (Farooq 2025).

    Args:
        beta: inverse temperature of the attention terms; default ``1 / sqrt(d)``.
        sigma: width of the Gaussian temporal kernel in steps (> 0; paper: 2).
        lambda_f: fidelity weight (>= 0; paper: 500).
        mu: continuity weight (>= 0).
        gamma: weight of the max term (>= 0).
        truncate: the fast solver keeps kernel entries within ``truncate * sigma`` steps (> 0).
        solver: ``"cccp"`` (fast, ours) or ``"lbfgs"`` (faithful, scipy L-BFGS-B).
        tol: L-BFGS-B tolerance (paper: 1e-5).
        cccp_tol: the CCCP solver stops when no coordinate moves by more than this.
        max_iter: iteration cap per step (L-BFGS / sequential CCCP) or sweep cap (batched CCCP).
        batched: the CCCP solver iterates all steps together (``True``) or one after the other.
    """

    def __init__(
        self,
        *,
        beta: float | None = None,
        sigma: float = 2.0,
        lambda_f: float = 500.0,
        mu: float = 1.0,
        gamma: float = 1.0,
        truncate: float = 4.0,
        solver: str = "cccp",
        tol: float = 1e-5,
        cccp_tol: float = 1e-7,
        max_iter: int = 500,
        batched: bool = True,
    ) -> None:
        super().__init__()
        self.beta = None if beta is None else positive_float("beta", beta)
        self.sigma = positive_float("sigma", sigma)
        self.lambda_f = positive_float("lambda_f", lambda_f, allow_zero=True)
        self.mu = positive_float("mu", mu, allow_zero=True)
        self.gamma = positive_float("gamma", gamma, allow_zero=True)
        self.truncate = positive_float("truncate", truncate)
        self.tol = positive_float("tol", tol)
        self.cccp_tol = positive_float("cccp_tol", cccp_tol)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        positive_int("max_iter", max_iter)
        self.solver, self.max_iter, self.batched = solver, max_iter, batched
        self.register_buffer("patterns", torch.empty(0, 0, dtype=torch.float64))

    # -- storage ---------------------------------------------------------------------------------
    def store(self, patterns: Tensor) -> "TemporalSequenceMemory":
        """Store a sequence ``(N, d)`` (N >= 2), each pattern rescaled to norm ``sqrt(d)``."""
        if not isinstance(patterns, Tensor) or patterns.dim() != 2:
            raise ValueError(f"patterns must be a tensor of shape (N, d), got {getattr(patterns, 'shape', type(patterns))}")
        if patterns.shape[0] < 2:
            raise ValueError(f"a sequence needs at least two patterns, got N={patterns.shape[0]}")
        if patterns.shape[1] < 1:
            raise ValueError(f"patterns must have d >= 1 features, got shape {tuple(patterns.shape)}")
        if not bool(torch.isfinite(patterns).all()):
            raise ValueError("patterns contain NaN or inf")
        norms = patterns.double().norm(dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            raise ValueError("patterns contain an all-zero pattern, which cannot be normalised to norm sqrt(d)")
        self.patterns = patterns.double() / norms * math.sqrt(patterns.shape[1])
        return self

    @property
    def num_patterns(self) -> int:
        return self.patterns.shape[0]

    @property
    def dim(self) -> int:
        return self.patterns.shape[1]

    def _beta(self) -> float:
        return self.beta if self.beta is not None else self.dim**-0.5

    def _require_patterns(self) -> None:
        if self.patterns.numel() == 0:
            raise RuntimeError("no sequence stored: call store(patterns) first")

    def kernel_weights(self, m: int) -> Tensor:
        """``w_k(m)`` over all ``k`` ``(N,)``: sums to one."""
        self._require_patterns()
        return log_kernel_row(self.num_patterns, m, self.sigma, device=self.patterns.device).exp()

    @property
    def window(self) -> int:
        """Half-width of the truncated kernel, ``ceil(truncate * sigma)`` steps."""
        return math.ceil(self.truncate * self.sigma)

    # -- energy and gradient (full kernel) ---------------------------------------------------------
    def _terms(self, s: Tensor, m: int, s_prev: Tensor | None):
        xi = self.patterns.to(s.dtype)
        beta = self._beta()
        log_w = log_kernel_row(self.num_patterns, m, self.sigma, dtype=s.dtype, device=s.device)
        overlap = s @ xi.T  # (..., N)
        attention = beta * overlap + log_w
        shifted = overlap + log_w / beta
        prev = xi[max(m - 1, 0)] if s_prev is None else s_prev
        return xi, beta, attention, shifted, prev

    def energy(self, s: Tensor, m: int, s_prev: Tensor | None = None) -> Tensor:
        """``E_m(s)`` for states ``(..., d)`` -> ``(...)``; ``s_prev`` defaults to ``xi_{m-1}``."""
        self._require_patterns()
        xi, beta, attention, shifted, prev = self._terms(s, m, s_prev)
        return (
            -torch.logsumexp(attention, -1) / beta
            - self.gamma * shifted.amax(-1)
            + 0.5 * (1.0 + self.gamma) * s.square().sum(-1)
            + self.lambda_f * (s - xi[m]).square().sum(-1)
            + self.mu * (s - prev).square().sum(-1)
        )

    def energy_grad(self, s: Tensor, m: int, s_prev: Tensor | None = None) -> Tensor:
        """``grad_s E_m(s)`` ``(..., d)`` (the max term contributes its active pattern's subgradient)."""
        self._require_patterns()
        xi, beta, attention, shifted, prev = self._terms(s, m, s_prev)
        pull = torch.softmax(attention, -1) @ xi + self.gamma * xi[shifted.argmax(-1)]
        return -pull + (1.0 + self.gamma) * s + 2.0 * self.lambda_f * (s - xi[m]) + 2.0 * self.mu * (s - prev)

    def step_energies(self, states: Tensor, init: Tensor | None = None, chunk: int = 512) -> Tensor:
        """``E_m(s_m)`` for every step ``(N,)`` with ``s_{m-1}`` taken from ``states`` (``init`` before step 0).

        Full kernel, computed in row chunks with matrix products (``O(N^2 d)`` flops, ``O(chunk N)`` memory).
        """
        self._require_patterns()
        xi, n, beta = self.patterns.to(states.dtype), self.num_patterns, self._beta()
        init = xi[0] if init is None else init.to(states)
        prev = torch.cat([init[None], states[:-1]])
        out = []
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(start + chunk, n), device=xi.device)
            logits = -(torch.arange(n, device=xi.device, dtype=states.dtype) - rows[:, None].to(states.dtype)).square()
            log_w = torch.log_softmax(logits / (2.0 * self.sigma**2), -1)
            s = states[rows]
            overlap = s @ xi.T
            out.append(
                -torch.logsumexp(beta * overlap + log_w, -1) / beta
                - self.gamma * (overlap + log_w / beta).amax(-1)
                + 0.5 * (1.0 + self.gamma) * s.square().sum(-1)
                + self.lambda_f * (s - xi[rows]).square().sum(-1)
                + self.mu * (s - prev[rows]).square().sum(-1)
            )
        return torch.cat(out)

    # -- solvers ---------------------------------------------------------------------------------
    def _denominator(self) -> float:
        return 1.0 + self.gamma + 2.0 * self.lambda_f + 2.0 * self.mu

    def _cccp_step(self, s: Tensor, prev: Tensor, centre: Tensor) -> Tensor:
        """One closed-form CCCP step for steps ``centre`` (``(M,)``) at states ``s`` ``(M, d)``, truncated kernel."""
        xi, n, w = self.patterns.to(s.dtype), self.num_patterns, self.window
        offsets = torch.arange(-w, w + 1, device=s.device)
        neighbour = rearrange(centre, "m -> m 1") + offsets  # (M, 2w+1)
        inside = (neighbour >= 0) & (neighbour < n)
        neighbour = neighbour.clamp(0, n - 1)
        log_w = (-offsets.to(s.dtype).square() / (2.0 * self.sigma**2)).expand(neighbour.shape)
        log_w = log_w.masked_fill(~inside, float("-inf"))
        # overlaps <s_m, xi_{m+o}> offset by offset: O(M w d) time, O(M d) extra memory
        overlap = torch.stack([(s * xi[neighbour[:, j]]).sum(-1) for j in range(neighbour.shape[1])], -1)
        beta = self._beta()
        p = torch.softmax(beta * overlap + log_w, -1)
        pull = sum(p[:, j : j + 1] * xi[neighbour[:, j]] for j in range(neighbour.shape[1]))
        best = torch.gather(neighbour, 1, (overlap + log_w / beta).argmax(-1, keepdim=True)).squeeze(1)
        pull = pull + self.gamma * xi[best]
        return (pull + 2.0 * self.lambda_f * xi[centre] + 2.0 * self.mu * prev) / self._denominator()

    def _cccp_sweep(self, states: Tensor, prev: Tensor, chunk: int = 64) -> Tensor:
        """One CCCP step for all ``N`` steps; neighbours are row views of the zero-padded patterns.

        Rows are processed in blocks of ``chunk`` steps so the working set stays in cache
        (``O(N w d)`` time, ``O(N d)`` memory).
        """
        xi, n, w = self.patterns.to(states.dtype), self.num_patterns, self.window
        padded = torch.nn.functional.pad(xi, (0, 0, w, w))
        offsets = torch.arange(-w, w + 1, device=xi.device)
        log_w_row = -offsets.to(states.dtype).square() / (2.0 * self.sigma**2)
        beta, out = self._beta(), torch.empty_like(states)
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            s = states[a:b]
            steps = torch.arange(a, b, device=xi.device)
            where = rearrange(steps, "m -> m 1") + offsets
            log_w = log_w_row.expand(b - a, -1).masked_fill((where < 0) | (where >= n), float("-inf"))
            blocks = [padded[a + j : b + j] for j in range(2 * w + 1)]
            overlap = torch.stack([torch.einsum("md,md->m", s, block) for block in blocks], -1)
            p = torch.softmax(beta * overlap + log_w, -1)
            pull = (2.0 * self.lambda_f) * xi[a:b] + (2.0 * self.mu) * prev[a:b]
            for j, block in enumerate(blocks):
                pull.addcmul_(p[:, j : j + 1], block)
            best = steps + (overlap + log_w / beta).argmax(-1) - w
            out[a:b] = pull.add_(xi[best], alpha=self.gamma).div_(self._denominator())
        return out

    def _solve_cccp(self, init: Tensor, trace_steps: set[int]):
        n = self.num_patterns
        xi = self.patterns
        trace: dict[int, list[float]] = {}
        if self.batched:
            states = torch.cat([init[None], xi[:-1]])  # start each step from the previous stored pattern
            sweeps = self.max_iter
            for sweep in range(1, self.max_iter + 1):
                prev = torch.cat([init[None], states[:-1]])
                new = self._cccp_sweep(states, prev)
                for m in trace_steps:
                    trace.setdefault(m, []).append(float(self.energy(new[m], m, prev[m])))
                change = float((new - states).abs().amax())
                states = new
                if change < self.cccp_tol:
                    sweeps = sweep
                    break
            return states, [sweeps] * n, trace
        states, iterations, prev = [], [], init
        for m in range(n):
            s, centre = prev, torch.tensor([m], device=xi.device)
            count = self.max_iter
            for it in range(1, self.max_iter + 1):
                new = self._cccp_step(s[None], prev[None], centre)[0]
                if m in trace_steps:
                    trace.setdefault(m, []).append(float(self.energy(new, m, prev)))
                change = float((new - s).abs().amax())
                s = new
                if change < self.cccp_tol:
                    count = it
                    break
            states.append(s)
            iterations.append(count)
            prev = s
        return torch.stack(states), iterations, trace

    def _solve_lbfgs(self, init: Tensor, trace_steps: set[int]):
        import numpy as np
        from scipy.optimize import minimize

        xi = self.patterns.cpu().numpy()
        n, beta, gamma = self.num_patterns, self._beta(), self.gamma
        states, iterations, trace = [], [], {}
        prev = init.detach().cpu().numpy().astype(np.float64)
        for m in range(n):
            log_w, target = log_kernel_row(n, m, self.sigma).numpy(), xi[m]

            def fun(s, prev=prev, log_w=log_w, target=target):
                overlap = xi @ s
                a = beta * overlap + log_w
                a_max = a.max()
                e = np.exp(a - a_max)
                lse = a_max + math.log(e.sum())
                shifted = overlap + log_w / beta
                best = int(shifted.argmax())
                value = (
                    -lse / beta - gamma * shifted[best] + 0.5 * (1 + gamma) * s @ s
                    + self.lambda_f * np.sum((s - target) ** 2) + self.mu * np.sum((s - prev) ** 2)
                )
                grad = (
                    -(e / e.sum()) @ xi - gamma * xi[best] + (1 + gamma) * s
                    + 2 * self.lambda_f * (s - target) + 2 * self.mu * (s - prev)
                )
                return value, grad

            history = []
            callback = (lambda xk: history.append(fun(xk)[0])) if m in trace_steps else None
            result = minimize(fun, prev, jac=True, method="L-BFGS-B", tol=self.tol,
                              options={"maxiter": self.max_iter}, callback=callback)
            if m in trace_steps:
                trace[m] = history
            states.append(result.x)
            iterations.append(int(result.nit))
            prev = result.x
        return torch.as_tensor(np.stack(states), dtype=torch.float64, device=self.patterns.device), iterations, trace

    def retrieve(
        self,
        init: Tensor | None = None,
        *,
        solver: str | None = None,
        trace: bool = False,
        trace_steps: tuple[int, ...] = (),
    ) -> SequenceRetrieval:
        """Retrieve the whole stored sequence step by step.

        Args:
            init: the state before step 0 (``s*_{-1}``, the cue) ``(d,)``; default the first pattern.
            solver: override the module's solver (``"cccp"`` or ``"lbfgs"``).
            trace: also compute ``E_m(s*_m)`` for every step (full kernel).
            trace_steps: steps whose per-iteration energies are recorded.
        """
        self._require_patterns()
        solver = self.solver if solver is None else solver
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        init = self.patterns[0] if init is None else init.to(self.patterns)
        if tuple(init.shape) != (self.dim,):
            raise ValueError(f"init must have shape (d,) = ({self.dim},), got {tuple(init.shape)}")
        if not bool(torch.isfinite(init).all()):
            raise ValueError(f"init must be finite; got NaN/inf at indices {torch.nonzero(~torch.isfinite(init)).flatten().tolist()}")
        steps = set(int(m) for m in trace_steps)
        with torch.no_grad():
            if solver == "cccp":
                states, iterations, per_step = self._solve_cccp(init, steps)
            else:
                states, iterations, per_step = self._solve_lbfgs(init, steps)
            energy = None
            if trace:
                energy = self.step_energies(states, init)
        return SequenceRetrieval(states=states, iterations=iterations, energy=energy, trace=per_step)

    def forward(self, patterns: Tensor | None = None, init: Tensor | None = None) -> Tensor:
        """Store ``patterns`` (if given) and return the retrieved states ``(N, d)``."""
        if patterns is not None:
            self.store(patterns)
        return self.retrieve(init).states

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, sigma={self.sigma}, lambda_f={self.lambda_f}, mu={self.mu}, gamma={self.gamma}, "
            f"truncate={self.truncate}, solver={self.solver!r}, batched={self.batched}"
        )
