"""Row-wise kernels and autograd functions behind `hopformer.functional.separation`.

All functions here work on a contiguous 2-D tensor of rows `(R, n)` (float32 or float64) and
map each row onto the probability simplex. On CPU the rows are processed in chunks of about
`_CHUNK_ELEMS` elements so that every intermediate stays in cache and is reused; on GPU a chunk
is the whole tensor.

Thresholds are found without sorting (Blondel et al. 2020; Peters et al. 2019):

- sparsemax (Martins & Astudillo 2016): Michelot's support iteration started from
  `tau = max - 1`, i.e. Newton's method on the piecewise-linear `sum (z - tau)_+ = 1` from the
  left; it increases monotonically and stops, exactly, when the support stops shrinking.
- alpha-entmax, `x = (alpha - 1) z`, `p = (x - tau)_+^(1 / (alpha - 1))`: Newton's method from
  the left (`tau = max x - 1`) on the convex `F(tau) = ||(x - tau)_+||_e = 1`,
  `e = 1 / (alpha - 1)` (exact in one step for a single or equal top entries). For alpha = 1.5
  (e = 2) the threshold is then taken in closed form on the found support
  (`tau = mean - sqrt(1/k - var)`, Peters et al. 2019, Alg. 2) and checked, so the result is
  exact; for other alpha the iteration stops at `|F - 1| <= tol` and the row is renormalised.

Backward passes use the closed-form Jacobian-vector products of Peters et al. 2019 (eq. 10,
`grad = gppr * (g - <g, gppr> / sum gppr)` with `gppr = p^(2 - alpha)`) and, for alpha,
Correia et al. 2019 (Adaptively sparse transformers, eq. 12-14).
"""

from __future__ import annotations

from typing import Iterator, Tuple, Union

import torch
from torch.autograd import Function

_CHUNK_ELEMS = 1 << 19
_MAX_NEWTON = 60

Exponent = Union[float, torch.Tensor]


def _chunks(rows: int, n: int, device: torch.device) -> Iterator[slice]:
    """Row slices of about `_CHUNK_ELEMS` elements (one slice on non-CPU devices)."""
    if device.type != "cpu":
        yield slice(0, rows)
        return
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Row maxima `(c, 1)`; all -inf rows get 0 so thresholds stay finite (their output is 0)."""
    m = x.amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(m).all()):
        if bool((torch.isnan(m) | torch.isposinf(m)).any()):
            raise ValueError("scores contain NaN or +inf: the separation maps need finite scores or -inf")
        m = m.masked_fill(torch.isneginf(m), 0.0)
    return m


def _pick(e: Exponent, sl: slice) -> Exponent:
    return e[sl] if isinstance(e, torch.Tensor) else e


# ----------------------------------------------------------------------------- sparsemax


def _sparsemax_rows(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write sparsemax of the rows of `x` into `out` (same shape); return the thresholds `(c, 1)`.

    Michelot's iteration from `tau = max - 1` (a lower bound of the threshold): the support
    `{x > tau}` shrinks until it is stable, and then `tau` is exact. Counts use `sign` of the
    clipped values (float ops; boolean tensors are several times slower on CPU).
    """
    tau = _row_max(x) - 1.0
    prev = None
    for _ in range(x.shape[-1] + 2):
        r = torch.sub(x, tau, out=out).relu_()
        cnt = torch.sign(r).sum(dim=-1, keepdim=True)
        if prev is not None and torch.equal(cnt, prev):
            return tau
        tau = tau + (r.sum(dim=-1, keepdim=True) - 1.0) / cnt.clamp_min(1.0)
        prev = cnt
    raise RuntimeError("sparsemax support iteration did not converge (please report)")


def _sparsemax_backward_rows(p: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """out = s * (g - mean_s(g)), s the support indicator (Martins & Astudillo 2016, eq. 14)."""
    support = torch.sign(p)
    mean = torch.linalg.vecdot(g, support).unsqueeze(-1) / support.sum(dim=-1, keepdim=True).clamp_min(1.0)
    torch.sub(g, mean, out=out).mul_(support)


class SparsemaxFunction(Function):
    """Sparsemax over the last dim of a contiguous `(R, n)` tensor, custom backward."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        p = torch.empty_like(z)
        for sl in _chunks(z.shape[0], z.shape[1], z.device):
            _sparsemax_rows(z[sl], p[sl])
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (p,) = ctx.saved_tensors
        g = g.contiguous()
        dz = torch.empty_like(g)
        for sl in _chunks(p.shape[0], p.shape[1], p.device):
            _sparsemax_backward_rows(p[sl], g[sl], dz[sl])
        return dz


# ----------------------------------------------------------------------------- alpha-entmax


def _entmax_rows(
    x: torch.Tensor, e: Exponent, out: torch.Tensor, tol: float, max_iter: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Write alpha-entmax of the rows of `x = (alpha - 1) z` into `out`, `e = 1 / (alpha - 1)`.

    Returns `(tau, norm)` `(c, 1)` with `out = (x - tau)_+^e / norm` (`norm = 1` on exact paths).
    `e == 2.0` (alpha = 1.5) finishes with the exact closed-form threshold on the support.
    """
    tiny = torch.finfo(x.dtype).tiny
    one = torch.ones((), dtype=x.dtype, device=x.device)
    tau = _row_max(x) - 1.0
    quadratic = isinstance(e, float) and e == 2.0
    linear = isinstance(e, float) and e == 1.0
    has_one = isinstance(e, torch.Tensor) and bool((e == 1.0).any())
    for _ in range(max_iter):
        r = torch.sub(x, tau, out=out).relu_()
        if quadratic:
            r_em1 = r
        elif linear:
            r_em1 = torch.sign(r)
        else:
            r_em1 = r.pow(e - 1.0)
            if has_one:  # rows with alpha = 2: 0^0 must count as 0
                r_em1.mul_(torch.sign(r))
        s_em1 = r_em1.sum(dim=-1, keepdim=True)
        f = torch.linalg.vecdot(r_em1, r).unsqueeze(-1)  # sum r^e; 0 only for all -inf rows
        f_safe = f.clamp_min(tiny)
        big_f = f_safe.sqrt() if quadratic else f_safe.pow(1.0 / e)
        empty = f <= 0
        if quadratic and bool((((big_f - 1.0).abs() <= 1e-3) | empty).all()):
            # closed form on the support S = {x > tau} (Peters et al. 2019, Alg. 2), exact when
            # {x > tau_cf} = S again (then sum_S (x - tau_cf)^2 = 1 is the optimality condition)
            cnt = torch.sign(r).sum(dim=-1, keepdim=True)
            k = cnt.clamp_min(1.0)
            mean = s_em1 / k
            tau_cf = tau + mean - (1.0 / k - (f / k - mean * mean)).clamp_min(0).sqrt()
            r2 = torch.sub(x, tau_cf).relu_()
            if torch.equal(torch.sign(r2).sum(dim=-1, keepdim=True), cnt):
                torch.mul(r2, r2, out=out)
                return tau_cf, one.expand_as(tau_cf)
        step = (big_f - 1.0) * f_safe / (big_f * s_em1.clamp_min(tiny))
        tau_new = tau + step.masked_fill_(empty, 0.0)
        if not quadratic and bool((((big_f - 1.0).abs() <= tol) | empty | (tau_new == tau)).all()):
            if not linear:
                r.mul_(r_em1)
            out.div_(f_safe)
            return tau, f_safe
        if quadratic and bool((tau_new == tau).all()):
            break
        tau = tau_new
    # reached only without exact convergence: last iterate, renormalised
    r = torch.sub(x, tau, out=out).relu_()
    if not linear:
        r.pow_(e)
    norm = out.sum(dim=-1, keepdim=True).clamp_min(tiny)
    out.div_(norm)
    return tau, norm


def _entmax_from_threshold(x: torch.Tensor, e: Exponent, tau: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Recompute `p = (x - tau)_+^e / norm` from saved thresholds."""
    r = torch.sub(x, tau).relu_()
    if isinstance(e, float) and e == 2.0:
        r.mul_(r)
    elif not (isinstance(e, float) and e == 1.0):
        r.pow_(e)
    return r.div_(norm)


def _gppr(p: torch.Tensor, alpha: Union[float, torch.Tensor]) -> torch.Tensor:
    """p^(2 - alpha) on the support, 0 elsewhere (Peters et al. 2019, eq. 10)."""
    if isinstance(alpha, float):
        if alpha == 1.5:
            return p.sqrt()
        if alpha == 2.0:
            return torch.sign(p)
        return p.pow(2.0 - alpha)
    gppr = p.pow(2.0 - alpha)
    if bool((alpha == 2.0).any()):
        gppr.mul_(torch.sign(p))
    return gppr


def _entmax_backward_rows(p, g, alpha, out, need_alpha: bool):
    """out = gppr * (g - <g, gppr> / sum gppr); returns d loss / d alpha per row when asked."""
    gppr = _gppr(p, alpha)
    s_gppr = gppr.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    q = torch.linalg.vecdot(g, gppr).unsqueeze(-1) / s_gppr
    torch.sub(g, q, out=out).mul_(gppr)
    if not need_alpha:
        return None
    # Correia et al. 2019, eq. 12-14: dp/dalpha
    am1 = alpha - 1.0
    plogp = torch.xlogy(p, p)
    ent = plogp.sum(dim=-1, keepdim=True)
    skew = gppr / s_gppr
    d = (p - skew) / (am1 * am1) - (plogp - skew * ent) / am1
    return torch.linalg.vecdot(g, d).unsqueeze(-1)


class EntmaxFunction(Function):
    """alpha-entmax over the last dim of `(R, n)` rows; alpha a float or an `(R, 1)` tensor.

    Differentiable w.r.t. the scores and (tensor) alpha. `tol` bounds `| ||p_unnorm||... - 1|`.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, alpha, tol: float = 1e-6, max_iter: int = _MAX_NEWTON):
        is_tensor = isinstance(alpha, torch.Tensor)
        a = alpha.detach().to(z.dtype) if is_tensor else float(alpha)
        e = 1.0 / (a - 1.0)
        p = torch.empty_like(z)
        for sl in _chunks(z.shape[0], z.shape[1], z.device):
            am1 = _pick(a, sl) - 1.0
            x = z[sl] * am1
            _entmax_rows(x, _pick(e, sl), p[sl], tol, max_iter)
        ctx.alpha = a if not is_tensor else None
        ctx.save_for_backward(p, a if is_tensor else None)
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, a_t = ctx.saved_tensors
        a = a_t if a_t is not None else ctx.alpha
        need_alpha = a_t is not None and ctx.needs_input_grad[1]
        g = g.contiguous()
        dz = torch.empty_like(g)
        da = torch.empty_like(a_t) if need_alpha else None
        for sl in _chunks(p.shape[0], p.shape[1], p.device):
            d = _entmax_backward_rows(p[sl], g[sl], _pick(a, sl), dz[sl], need_alpha)
            if need_alpha:
                da[sl] = d
        return dz, da, None, None
