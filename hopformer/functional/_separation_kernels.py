"""Row-wise kernels and autograd functions behind `hopformer.functional.separation`.

All functions here work on a contiguous 2-D tensor of rows `(R, n)` (float32 or float64) and
map each row onto the probability simplex. On CPU the rows are processed in chunks of about
`_CHUNK_ELEMS` elements with preallocated scratch buffers, so every intermediate stays in cache
and no large temporary is allocated (page faults of fresh buffers cost more than the arithmetic);
on GPU a chunk is the whole tensor.

Thresholds are found without sorting (cf. Blondel et al. 2020; Peters et al. 2019):

- sparsemax (Martins & Astudillo 2016): Michelot's support iteration `tau <- (sum_S x - 1)/|S|`,
  `S = {x > tau}`, i.e. Newton's method on the piecewise-linear `sum (x - tau)_+ = 1` from the
  left, started from the exact threshold of the row's group maxima (`_group_max_bound`: the
  threshold of any subset of a row is a lower bound), else from `max(max x - 1, (sum x - 1) / n)`. `tau` increases
  monotonically and is exact as soon as the support stops changing; rows that have converged
  leave the iteration (row compaction).
- alpha-entmax, `x = (alpha - 1) z`, `p = (x - tau)_+^e`, `e = 1 / (alpha - 1)`: Newton's method
  from the left on the convex `F(tau) = ||(x - tau)_+||_e = 1` (exact in one step when the top
  entries are equal), started from `max(max x - 1, mean x - n^(-1/e))` (power-mean bound), raised
  on long rows by a few Newton steps on the row's group maxima (`_group_max_bound`). For
  alpha = 1.5 (e = 2) each row finishes with the closed-form threshold on its support
  (`tau = mean - sqrt(1/k - var)`, Peters et al. 2019, Alg. 2), accepted only if it reproduces
  that support, so the result is exact; for other alpha a row stops at `|F - 1| <= tol` (or when
  Newton stalls) and is renormalised.

Backward passes use the closed-form Jacobian-vector products of Peters et al. 2019 (eq. 10,
`grad = gppr * (g - <g, gppr> / sum gppr)`, `gppr = p^(2 - alpha)`: the support indicator for
sparsemax, `sqrt(p)` for 1.5-entmax) and, for alpha, Correia et al. 2019 (Adaptively sparse
transformers, eq. 12-14).
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

import torch
from torch.autograd import Function

_CHUNK_ELEMS = 1 << 18
_MAX_NEWTON = 60

Exponent = Union[float, torch.Tensor]
T = TypeVar("T")

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_KEY: Tuple[int, int] = (0, 0)
_POOL_LOCK = threading.Lock()
_NUM_WORKERS: Optional[int] = None  # None: follow torch.get_num_threads()
_KERNEL_PATHS = ("auto", "native", "rows", "torch", "reference")
_KERNEL_PATH: Optional[str] = None  # None: the environment variable HOPFORMER_KERNEL_PATH, else "auto"


def _env_workers() -> Optional[int]:
    value = os.environ.get("HOPFORMER_NUM_WORKERS", "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"HOPFORMER_NUM_WORKERS must be an integer >= 0; got {value!r}") from None
    if n < 0:
        raise ValueError(f"HOPFORMER_NUM_WORKERS must be an integer >= 0; got {value!r}")
    return n


def set_num_workers(n: Optional[int]) -> None:
    """Set the number of CPU worker threads of the sparse separation kernels.

    `None` (default) follows `torch.get_num_threads()`; `0` or `1` turns the pool off (every block
    runs in the calling thread with torch's own intra-op threads); `n > 1` uses `n` threads (each
    capped at `torch.get_num_threads()`). The environment variable `HOPFORMER_NUM_WORKERS` sets the
    initial value. GPU tensors never use the pool.
    """
    global _NUM_WORKERS
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ValueError(f"set_num_workers expects None or an integer >= 0; got {n!r}")
    _NUM_WORKERS = n


def set_kernel_path(path: Optional[str]) -> None:
    """Choose the CPU kernels of the sparse attention core (for A/B measurements and tests).

    `"auto"` (default): the fused C++ kernels (`hopformer/functional/_native`, built with the system's
    C++ compiler at first use and cached): the tile kernels for rows of fewer than 256 keys (16 rows a
    vector), the row kernels for longer rows (general-alpha rows shorter than 32 entries off the tiles keep
    the torch-op kernels, faster there), else, when they cannot be built, the torch-op kernels (with one
    warning saying why); `"native"`: the C++ kernels or an error; `"rows"`: as "auto" without the tile
    kernels (every row on its own, as before them); `"torch"`: the torch-op kernels; `"reference"`: the
    torch-op kernels as they were before the small-sequence work of issue 14 (`torch.pow` / `torch.xlogy`
    on whole blocks, blocks cut at the block size with a possibly tiny last block, a second row maximum per
    block). All give the same results to float rounding. `None` goes back to the environment variable
    `HOPFORMER_KERNEL_PATH` (read at each call), else `"auto"`.
    """
    global _KERNEL_PATH
    if path is not None and path not in _KERNEL_PATHS:
        raise ValueError(f"set_kernel_path expects one of {_KERNEL_PATHS} or None; got {path!r}")
    _KERNEL_PATH = path


def get_kernel_path() -> str:
    """The kernel path the sparse attention core uses now (see `set_kernel_path`)."""
    if _KERNEL_PATH is not None:
        return _KERNEL_PATH
    value = os.environ.get("HOPFORMER_KERNEL_PATH", "").strip() or "auto"
    if value not in _KERNEL_PATHS:
        raise ValueError(f"HOPFORMER_KERNEL_PATH must be one of {_KERNEL_PATHS}; got {value!r}")
    return value


def _reference() -> bool:
    return get_kernel_path() == "reference"


_WARNED_NATIVE = False


_NATIVE_MIN_GENERAL = 32  # general-alpha rows shorter than this: the torch-op kernels (see below)


def _native_kernels(device: torch.device, row_len: int = 1 << 30, general: bool = False, tiles: bool = False):
    """The fused C++ kernels (module `hopformer.functional._native`) when the kernel path and the
    device allow them and they load, else None (the torch-op kernels).

    With the default path "auto", rows of a general alpha (not sparsemax, not a float 1.5) shorter than
    `_NATIVE_MIN_GENERAL` stay on the torch-op kernels: there each C++ row pays its fixed cost (powers
    and reductions on a vector of 16 lanes for a few entries) and the torch ops, spread over many short
    rows, were 15-30% faster (rows of 7 and 16; faster from 32 on; docs/performance.md). Callers that
    run such rows on the tile kernels (`tiles=True`, 16 rows a vector) take the C++ kernels there too:
    0.65-0.79x the torch ops' time at rows of 8-24."""
    global _WARNED_NATIVE
    path = get_kernel_path()
    if device.type != "cpu" or path in ("torch", "reference"):
        return None
    if general and row_len < _NATIVE_MIN_GENERAL and (path == "rows" or (path == "auto" and not tiles)):
        return None
    from hopformer.functional import _native

    if _native.load() is not None:
        return _native
    if path == "native":
        raise RuntimeError(f"set_kernel_path('native'): the native kernels could not be built: {_native.error()}")
    if not _WARNED_NATIVE:
        _WARNED_NATIVE = True
        warnings.warn(f"hopformer: the fused C++ sparse kernels could not be built ({_native.error()}); using the "
                      "slower torch-op kernels (set HOPFORMER_KERNEL_PATH=torch to choose them explicitly)",
                      RuntimeWarning, stacklevel=3)
    return None


def get_num_workers() -> int:
    """The number of worker threads the sparse kernels use on CPU now (1: no pool)."""
    threads = torch.get_num_threads()
    n = _NUM_WORKERS if _NUM_WORKERS is not None else _env_workers()
    return max(1, threads if n is None else min(n, threads))


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of `workers` threads that run torch ops with one intra-op thread each
    (re-created after a fork, whose child has no pool threads)."""
    global _POOL, _POOL_KEY
    with _POOL_LOCK:
        if _POOL is None or _POOL_KEY != (os.getpid(), workers):
            if _POOL is not None and _POOL_KEY[0] == os.getpid():
                _POOL.shutdown(wait=False)  # idle threads of the old size exit
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="hopformer-sep", initializer=torch.set_num_threads,
                                       initargs=(1,))
            _POOL_KEY = (os.getpid(), workers)
        return _POOL


def _no_grad(job: Callable[[Iterable[int]], T], part: Iterable[int], inference: bool = False) -> T:
    """Run `job(part)` without autograd; under `torch.inference_mode` when the caller was in it.

    Inference mode is per thread: a pool thread does not inherit it from the caller, and an in-place
    write there into a tensor created under the caller's inference mode raises. So the caller's mode
    is carried over explicitly."""
    if inference:
        with torch.inference_mode():
            return job(part)
    with torch.no_grad():
        return job(part)


class _Queue:
    """Indices `0 .. n-1` handed out one at a time to whichever worker asks first (thread safe)."""

    def __init__(self, n: int):
        self._next, self._n, self._lock = 0, n, threading.Lock()

    def __iter__(self) -> Iterator[int]:
        while True:
            with self._lock:
                i = self._next
                self._next += 1
            if i >= self._n:
                return
            yield i


def _parallel(job: Callable[[Iterable[int]], T], n_items: int, device: torch.device) -> List[T]:
    """Run `job(items)` on every worker; `items` yields the indices of `range(n_items)` that this
    worker takes, and each index goes to exactly one worker.

    On CPU the items are many small, cache-sized blocks; OpenMP's per-op parallel regions scale
    badly for them (and collapse when the cores are shared), so the blocks are spread over
    `get_num_workers()` Python threads instead, each running its ops single-threaded. The items are
    handed out dynamically (a worker slowed down by a competing process simply takes fewer), so the
    job must write disjoint outputs per item. Elsewhere (or with one worker) the job runs inline.
    Returns the per-worker results.
    """
    workers = min(get_num_workers(), n_items) if device.type == "cpu" else 1
    if workers <= 1 or threading.current_thread().name.startswith("hopformer-sep"):
        return [_no_grad(job, range(n_items))]
    queue = _Queue(n_items)
    inference = torch.is_inference_mode_enabled()
    futures = [_pool(workers).submit(_no_grad, job, queue, inference) for _ in range(workers)]
    return [f.result() for f in futures]


def _default_tol(dtype: torch.dtype) -> float:
    """Newton tolerance on `| ||(x - tau)_+||_e - 1 |` for general alpha (rows are renormalised)."""
    return 1e-12 if dtype == torch.float64 else 1e-5


def _chunks(rows: int, n: int, device: torch.device) -> Iterator[slice]:
    """Row slices of about `_CHUNK_ELEMS` elements (one slice on non-CPU devices)."""
    if device.type != "cpu":
        yield slice(0, rows)
        return
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def _scratch(like: torch.Tensor, n: int, count: int = 1):
    """`count` flat scratch buffers big enough for one chunk of rows of length `n`."""
    if like.device.type != "cpu":
        return [None] * count
    size = max(1, _CHUNK_ELEMS // max(n, 1)) * n
    return [like.new_empty(min(size, like.numel())) for _ in range(count)]


def _view(buf: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    if buf is None or buf.numel() < like.numel():
        return None
    return buf[: like.numel()].view(like.shape)


def _row_max(x: torch.Tensor) -> torch.Tensor:
    """Row maxima `(c, 1)`; all -inf rows get 0 so thresholds stay finite (their output is 0)."""
    m = x.amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(m).all()):
        if bool((torch.isnan(m) | torch.isposinf(m)).any()):
            raise ValueError("scores contain NaN or +inf: the separation maps need finite scores or -inf")
        m = m.masked_fill(torch.isneginf(m), 0.0)
    return m


def _top_minus_one(x: torch.Tensor, shifted: bool) -> torch.Tensor:
    """`max x - 1` per row `(c, 1)`, the first lower bound of every threshold; -1 without a pass over
    `x` when its rows are `shifted` (row maximum 0, or all -inf, whose `_row_max` is 0 as well)."""
    if shifted and not _reference():
        return x.new_full((x.shape[0], 1), -1.0)
    return _row_max(x) - 1.0


def _pick(e: Exponent, sl: slice) -> Exponent:
    return e[sl] if isinstance(e, torch.Tensor) else e


def _pow_pos(
    r: torch.Tensor, y: Exponent, out: Optional[torch.Tensor] = None, scratch: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`r^y` on the entries `r > 0` and 0 elsewhere (also for `y = 0`), for `r >= 0` and a float
    or broadcastable tensor `y >= 0`; written into `out` when given (`out` must not be `r`), with
    `scratch` (same shape, or None) for the support mask.

    Computed as `exp(max(y log r, floor))` with `r` clamped to the smallest normal float, times
    `sign(r)`: on CPU `torch.pow` is a scalar loop, and `log` of exact zeros and `exp` of results
    below the smallest normal float take slow special-value paths (each 10-60x slower per block on
    the development machine). Agrees with `torch.pow` to a few float ulps times `|y log r|`, and
    where `r^y` is below `exp(floor)` (about 1e-35 in float32, 1e-304 in float64) it returns that."""
    tiny = torch.finfo(r.dtype).tiny
    floor = -80.0 if r.dtype != torch.float64 else -700.0
    res = torch.clamp_min(r, tiny, out=out) if out is not None else r.clamp_min(tiny)
    res.log_().mul_(y).clamp_min_(floor).exp_()
    return res.mul_(torch.sign(r, out=scratch) if scratch is not None else torch.sign(r))


def _xlogx(p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`p log p` (0 at `p = 0`) into `out`; `log` of a float clamped to the smallest normal, so no
    exact zero reaches `log` (`torch.xlogy(p, p)` is 8-10x slower on blocks with many zeros)."""
    if _reference():
        return torch.xlogy(p, p, out=out)
    return torch.clamp_min(p, torch.finfo(p.dtype).tiny, out=out).log_().mul_(p)


# ----------------------------------------------------------------------------- sparsemax

_GROUP = 8  # columns per group of the lower-bound warm start
_GROUP_STEPS = 3


def _group_max_bound(x: torch.Tensor, tau: torch.Tensor, step: Callable) -> torch.Tensor:
    """A better lower bound on the threshold of the rows of `x`, from the maxima of groups of
    `_GROUP` columns (one pass plus a few iterations on an 8x narrower problem).

    The threshold of any subset `S` of a row's entries is a lower bound on the row's threshold
    (`sum_S (x - tau)_+^e <= sum (x - tau)_+^e`, so the subset's equation reaches 1 at a smaller tau),
    and Newton / Michelot iterates from the left on the subset stay below the subset's threshold.
    The group maxima are such a subset and hold the top entries of a row unless two of them share a
    group, so the full iteration then starts next to the root and typically stops after two passes
    instead of five or six (Michelot 1986; Peters et al. 2019)."""
    c = x.shape[-1] // _GROUP * _GROUP
    if c < 4 * _GROUP:
        return tau
    gm = x[:, :c]  # maxima of the strided groups {j, j + c/8, ...}: three halvings (vectorised)
    while gm.shape[-1] > c // _GROUP:
        half = gm.shape[-1] // 2
        gm = torch.maximum(gm[:, :half], gm[:, half:])
    for _ in range(_GROUP_STEPS):
        tau = step(gm, tau)
    return tau


def _michelot_step(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """One Michelot (Newton) step from a lower bound `tau` for sparsemax; stays a lower bound."""
    r = (x - tau).relu_()
    cnt = torch.sign(r).sum(dim=-1, keepdim=True).clamp_min_(1.0)
    return torch.maximum(tau, tau + (r.sum(dim=-1, keepdim=True) - 1.0) / cnt)


def _sparsemax_rows(
    x: torch.Tensor, out: torch.Tensor, scratch: Optional[torch.Tensor] = None, shifted: bool = False
) -> torch.Tensor:
    """Write sparsemax of the rows of `x` into `out` (same shape); return the thresholds `(c, 1)`.

    `shifted`: the rows of `x` have maximum 0 already (saves a pass). Counts use `sign` of the
    clipped values (float ops; boolean tensors are slower on CPU).
    """
    n = x.shape[-1]
    if n >= 4 * _GROUP:
        tau = _group_max_bound(x, _top_minus_one(x, shifted), _michelot_step)
    else:
        tau = torch.maximum(_top_minus_one(x, shifted), (x.sum(dim=-1, keepdim=True) - 1.0) / n)
    scratch = _view(scratch, x)
    act = None  # indices of the rows still iterating (None: all rows)
    xa, prev = x, None
    for _ in range(n + 2):
        full = act is None
        ta = tau if full else tau[act]
        r = torch.sub(xa, ta, out=out if full else None).relu_()
        cnt = (torch.sign(r, out=scratch) if full and scratch is not None else torch.sign(r)).sum(-1, keepdim=True)
        moving = None
        if prev is not None:
            moving = (cnt != prev).squeeze(-1)
            k = int(moving.sum())
            if k == 0:
                break
        # monotone by theory; the max keeps float rounding from re-growing the support (termination)
        new = torch.maximum(ta, ta + (r.sum(dim=-1, keepdim=True) - 1.0) / cnt.clamp_min(1.0))
        if full:
            tau = new
        else:
            tau[act] = new
        if moving is not None and 4 * k <= r.shape[0]:
            sel = moving.nonzero().squeeze(-1)
            act = sel if full else act[sel]
            xa, cnt = x[act], cnt[sel]
        prev = cnt
    else:  # unreachable in exact arithmetic (the support shrinks every step): renormalise
        r = torch.sub(x, tau, out=out).relu_()
        r.div_(r.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny))
        return tau
    if act is not None:
        torch.sub(x, tau, out=out).relu_()
    return tau


def _sparsemax_backward_rows(
    p: torch.Tensor, g: torch.Tensor, out: torch.Tensor, scratch: Optional[torch.Tensor] = None
) -> None:
    """out = s * (g - mean_s(g)), s the support indicator (Martins & Astudillo 2016, eq. 14)."""
    scratch = _view(scratch, p)
    support = torch.sign(p, out=scratch) if scratch is not None else torch.sign(p)
    torch.mul(g, support, out=out)
    mean = out.sum(dim=-1, keepdim=True) / support.sum(dim=-1, keepdim=True).clamp_min(1.0)
    out.addcmul_(support, mean, value=-1.0)


class SparsemaxFunction(Function):
    """Sparsemax over the last dim of a contiguous `(R, n)` tensor, custom backward."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        p = torch.empty_like(z)
        slices = list(_chunks(z.shape[0], z.shape[1], z.device))
        native = _native_kernels(z.device)
        if native is not None:
            z = z.contiguous()
            stats = z.new_empty(3, z.shape[0])  # threshold, row maximum, normaliser (not needed here)

            def job(part):
                for i in part:
                    sl = slices[i]
                    native.forward(z[sl], p[sl], "sparsemax", None, 2.0, 0.0, 0, stats[0, sl], stats[1, sl],
                                   stats[2, sl])

            _parallel(job, len(slices), z.device)
            ctx.save_for_backward(p)
            return p

        def job(part):
            buf, shifted = _scratch(z, z.shape[1], 2)
            for i in part:
                zc = z[slices[i]]  # shifted by the row max: thresholds near 0 keep full precision
                xs = torch.sub(zc, _row_max(zc), out=_view(shifted, zc)) if shifted is not None else zc - _row_max(zc)
                _sparsemax_rows(xs, p[slices[i]], buf, shifted=True)

        _parallel(job, len(slices), z.device)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (p,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: differentiable formula
            s = torch.sign(p)
            return s * (g - (g * s).sum(-1, keepdim=True) / s.sum(-1, keepdim=True).clamp_min(1.0))
        g = g.contiguous()
        dz = torch.empty_like(g)
        slices = list(_chunks(p.shape[0], p.shape[1], p.device))

        def job(part):
            (buf,) = _scratch(p, p.shape[1])
            for i in part:
                _sparsemax_backward_rows(p[slices[i]], g[slices[i]], dz[slices[i]], buf)

        _parallel(job, len(slices), p.device)
        return dz


# ----------------------------------------------------------------------------- alpha-entmax


def _newton_step(x: torch.Tensor, tau: torch.Tensor, e: Exponent) -> torch.Tensor:
    """One Newton step from a lower bound `tau` on the convex `||(x - tau)_+||_e = 1` (Peters et al.
    2019); stays a lower bound (the warm start of `_group_max_bound`)."""
    tiny = torch.finfo(x.dtype).tiny
    r = (x - tau).relu_()
    if isinstance(e, float) and e == 2.0:
        r_em1 = r
    else:
        r_em1 = (torch.where(r > 0, r.pow(e - 1.0), torch.zeros_like(r)) if _reference()
                 else _pow_pos(r, e - 1.0))  # 0^0 = 0 (alpha = 2 rows)
    s_em1 = r_em1.sum(dim=-1, keepdim=True)
    f = torch.linalg.vecdot(r_em1, r).unsqueeze(-1)  # sum r^e
    big_f = f.clamp_min(tiny).pow(1.0 / e)
    step = (big_f - 1.0) * f / (big_f * s_em1.clamp_min(tiny))
    return torch.maximum(tau, tau + step.masked_fill_(f <= 0, 0.0))


def _entmax_rows(
    x: torch.Tensor,
    e: Exponent,
    out: torch.Tensor,
    tol: float,
    max_iter: int,
    scratch: Optional[torch.Tensor] = None,
    scratch2: Optional[torch.Tensor] = None,
    shifted: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Write alpha-entmax of the rows of `x = (alpha - 1) z` into `out`, `e = 1 / (alpha - 1)`.

    Returns `(tau, norm)` `(c, 1)` with `out = (x - tau)_+^e / norm` (`norm = 1` on exact rows).
    `shifted`: the rows of `x` have maximum 0 already (saves a pass).
    """
    if isinstance(e, float) and e == 2.0:
        return _entmax15_rows(x, out, max_iter, scratch, scratch2, shifted)
    tiny = torch.finfo(x.dtype).tiny
    n = x.shape[-1]
    linear = isinstance(e, float) and e == 1.0
    fast_pow = not _reference()
    has_one = not fast_pow and isinstance(e, torch.Tensor) and bool((e == 1.0).any())
    inv_e = 1.0 / e
    bound = x.mean(dim=-1, keepdim=True) - (n**-inv_e if isinstance(e, float) else torch.pow(n, -inv_e))
    tau = torch.maximum(_top_minus_one(x, shifted), bound)
    if n >= 16 * _GROUP:  # the warm start's powers pay off on long rows only
        tau = _group_max_bound(x, tau, lambda xs, t: _newton_step(xs, t, e))
    scratch, scratch2 = _view(scratch, x), _view(scratch2, x)
    for _ in range(max_iter):
        r = torch.sub(x, tau, out=out).relu_()
        if linear:
            r_em1 = torch.sign(r, out=scratch) if scratch is not None else torch.sign(r)
        elif fast_pow:
            r_em1 = _pow_pos(r, e - 1.0, scratch, scratch2)
        else:
            r_em1 = torch.pow(r, e - 1.0, out=scratch) if scratch is not None else r.pow(e - 1.0)
            if has_one:  # rows with alpha = 2: 0^0 must count as 0
                r_em1.mul_(torch.sign(r))
        s_em1 = r_em1.sum(dim=-1, keepdim=True)
        f = torch.linalg.vecdot(r_em1, r).unsqueeze(-1)  # sum r^e; 0 only for all -inf rows
        f_safe = f.clamp_min(tiny)
        big_f = f_safe.pow(inv_e)
        empty = f <= 0
        step = ((big_f - 1.0) * f_safe / (big_f * s_em1.clamp_min(tiny))).masked_fill_(empty, 0.0)
        tau_new = tau + step
        if bool((((big_f - 1.0).abs() <= tol) | empty | (tau_new == tau)).all()):
            if not linear:  # r^e at the current tau
                r.mul_(r_em1)
            out.div_(f_safe)
            return tau, f_safe
        tau = tau_new
    r = torch.sub(x, tau, out=out).relu_()
    if not linear:
        if fast_pow:
            r.mul_(_pow_pos(r, e - 1.0))
        else:
            r.pow_(e)
    norm = r.sum(dim=-1, keepdim=True).clamp_min(tiny)
    out.div_(norm)
    return tau, norm


def _entmax15_rows(
    x: torch.Tensor,
    out: torch.Tensor,
    max_iter: int,
    scratch: Optional[torch.Tensor] = None,
    scratch2: Optional[torch.Tensor] = None,
    shifted: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact 1.5-entmax of the rows of `x = z / 2`: Newton from the left on `||(x - tau)_+||_2 = 1`;
    at every iterate the closed-form threshold of the support `S = {x > tau}` is tried and
    accepted when `{x > tau_cf} = S` (then `sum_S (x - tau_cf)^2 = 1` is the optimality
    condition). Rows that are done leave the iteration."""
    tiny = torch.finfo(x.dtype).tiny
    n = x.shape[-1]
    if n >= 4 * _GROUP:
        tau = _group_max_bound(x, _top_minus_one(x, shifted), lambda xs, t: _newton_step(xs, t, 2.0))
    else:
        tau = torch.maximum(_top_minus_one(x, shifted), x.mean(dim=-1, keepdim=True) - n**-0.5)
    exact = torch.zeros_like(tau, dtype=torch.bool)
    scratch, scratch2 = _view(scratch, x), _view(scratch2, x)
    act = None  # indices of the rows still iterating (None: all rows)
    xa = x
    for _ in range(max_iter):
        full = act is None
        ta = tau if full else tau[act]
        r = torch.sub(xa, ta, out=out if full else None).relu_()
        s1 = r.sum(dim=-1, keepdim=True)
        f = torch.linalg.vecdot(r, r).unsqueeze(-1)
        big_f = f.sqrt()  # 0 only for all -inf rows, whose step is then 0
        newton = ta + (big_f - 1.0) * big_f / s1.clamp_min(tiny)
        ok = None
        if bool(((big_f - 1.0).abs() <= 0.1).any()):  # the closed form rarely holds far from the root
            sgn = torch.sign(r, out=scratch) if full and scratch is not None else torch.sign(r)
            cnt = sgn.sum(-1, keepdim=True)
            k = cnt.clamp_min(1.0)
            mean = s1 / k
            tau_cf = ta + mean - ((1.0 - f) / k + mean * mean).clamp_min(0).sqrt()
            r2 = torch.sub(xa, tau_cf, out=scratch2 if full else None).relu_()
            sgn2 = torch.sign(r2, out=scratch) if full and scratch is not None else torch.sign(r2)
            ok = sgn2.sum(-1, keepdim=True) == cnt  # also true for all -inf rows (output 0)
            newton = torch.where(ok, tau_cf, newton)
        stalled = newton == ta
        stop = stalled if ok is None else ok | stalled
        ok = torch.zeros_like(stalled) if ok is None else ok
        if full:
            tau, exact = newton, ok
        else:
            tau[act], exact[act] = newton, ok
        live = ~stop.squeeze(-1)
        n_live = int(live.sum())
        if n_live == 0:
            break
        if 4 * n_live <= r.shape[0]:
            sel = live.nonzero().squeeze(-1)
            act = sel if full else act[sel]
            xa = x[act]
    r = torch.sub(x, tau, out=out).relu_()
    r.mul_(r)
    if bool(exact.all()):
        return tau, torch.ones_like(tau)
    norm = r.sum(dim=-1, keepdim=True).clamp_min(tiny).masked_fill_(exact, 1.0)
    out.div_(norm)
    return tau, norm


def _gppr(
    p: torch.Tensor,
    alpha: Union[float, torch.Tensor],
    out: Optional[torch.Tensor] = None,
    scratch: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """p^(2 - alpha) on the support, 0 elsewhere (Peters et al. 2019, eq. 10); `scratch` (same shape
    as `p`, or None) is a temporary of the exp-log power."""
    kw = {} if out is None else {"out": out}
    if isinstance(alpha, float) and alpha == 2.0:
        return torch.sign(p, **kw)
    if not _reference():  # no torch.pow, no sqrt / log of exact zeros (`_pow_pos`)
        return _pow_pos(p, 2.0 - alpha, out, scratch)
    if isinstance(alpha, float):
        if alpha == 1.5:
            return torch.sqrt(p, **kw)
        return torch.pow(p, 2.0 - alpha, **kw)
    gppr = torch.pow(p, 2.0 - alpha, **kw)
    if bool((alpha == 2.0).any()):
        gppr.mul_(torch.sign(p))
    return gppr


def _entmax_weights_and_gppr(
    x: torch.Tensor,
    alpha: Union[float, torch.Tensor],
    tau: torch.Tensor,
    norm: torch.Tensor,
    scratch: torch.Tensor,
    scratch2: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """From saved thresholds: `p = (x - tau)_+^e / norm` (in place in `x`) and `gppr = p^(2 - alpha)`
    (in `scratch`) with a single power: `gppr = (x - tau)_+^(e - 1) * norm^(alpha - 2)`
    (`scratch2`, same shape or None: a temporary for the general-alpha power)."""
    r = x.sub_(tau).relu_()
    if isinstance(alpha, float) and alpha == 2.0:
        gppr = torch.sign(r, out=scratch)
        return r.div_(norm), gppr
    if isinstance(alpha, float) and alpha == 1.5:
        gppr = torch.mul(r, norm.rsqrt(), out=scratch)
        return r.mul_(r).div_(norm), gppr
    e = 1.0 / (alpha - 1.0)
    if not _reference():
        r_em1 = _pow_pos(r, e - 1.0, scratch, scratch2)
    else:
        r_em1 = torch.pow(r, e - 1.0, out=scratch)
        if isinstance(alpha, torch.Tensor) and bool((alpha == 2.0).any()):
            r_em1.mul_(torch.sign(r))
    p = r.mul_(r_em1).div_(norm)
    return p, r_em1.mul_(torch.pow(norm, alpha - 2.0))


def _entmax_backward_rows(
    p, g, alpha, out, need_alpha: bool, scratch: Optional[torch.Tensor] = None, gppr: Optional[torch.Tensor] = None
):
    """out = gppr * (g - <g, gppr> / sum gppr); returns d loss / d alpha per row when asked."""
    if gppr is None:  # `out` is free until the product below: the power's temporary
        gppr = _gppr(p, alpha, _view(scratch, p), out)
    s_gppr = gppr.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    torch.mul(g, gppr, out=out)
    q = out.sum(dim=-1, keepdim=True) / s_gppr
    out.addcmul_(gppr, q, value=-1.0)
    if not need_alpha:
        return None
    # Correia et al. 2019, eq. 12-14: dp/dalpha = (p - skew) / (a-1)^2 - (p log p - skew H) / (a-1)
    # with skew = gppr / sum gppr and H = sum p log p; contracted with g row by row as sums
    # (<g, skew> = q above), so no full-size temporary is formed.
    am1 = alpha - 1.0
    plogp = _xlogx(p, gppr)  # gppr is not needed any more
    ent = plogp.sum(dim=-1, keepdim=True)
    g_plogp = torch.linalg.vecdot(g, plogp).unsqueeze(-1)
    g_p = torch.linalg.vecdot(g, p).unsqueeze(-1)
    return (g_p - q) / (am1 * am1) - (g_plogp - q * ent) / am1


def _entmax_backward_simple(p, g, a, need_alpha: bool):
    """Differentiable (double-backward) form of `_entmax_backward_rows`."""
    on = p > 0
    p_safe = torch.where(on, p, torch.ones_like(p))  # keeps d/dp of p^(2-a), p log p finite at p = 0
    gppr = torch.where(on, p_safe.pow(2.0 - a), torch.zeros_like(p))
    s = gppr.sum(-1, keepdim=True)
    dz = gppr * (g - (g * gppr).sum(-1, keepdim=True) / s)
    if not need_alpha:
        return dz, None
    am1 = a - 1.0
    plogp = torch.where(on, p_safe * torch.log(p_safe), torch.zeros_like(p))
    skew = gppr / s
    d = (p - skew) / (am1 * am1) - (plogp - skew * plogp.sum(-1, keepdim=True)) / am1
    return dz, (g * d).sum(-1, keepdim=True)


class EntmaxFunction(Function):
    """alpha-entmax over the last dim of `(R, n)` rows; alpha a float in (1, 2] or an `(R, 1)` tensor.

    Differentiable w.r.t. the scores and (tensor) alpha; `tol` and `max_iter` as in `_entmax_rows`.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, alpha, tol: float = 1e-5, max_iter: int = _MAX_NEWTON):
        is_tensor = isinstance(alpha, torch.Tensor)
        a = alpha.detach().to(z.dtype) if is_tensor else float(alpha)
        e = 1.0 / (a - 1.0)
        p = torch.empty_like(z)
        slices = list(_chunks(z.shape[0], z.shape[1], z.device))
        native = _native_kernels(z.device, z.shape[1], general=is_tensor or a != 1.5)
        if native is not None:
            a_rows = a.reshape(-1).contiguous() if is_tensor else None
            stats = z.new_empty(3, z.shape[0])

            def job(part):
                for i in part:
                    sl = slices[i]
                    x = z[sl] * (_pick(a, sl) - 1.0)
                    native.forward(x, p[sl], "entmax", a_rows[sl] if is_tensor else None, a if not is_tensor else 0.0,
                                   tol, max_iter, stats[0, sl], stats[1, sl], stats[2, sl])

            _parallel(job, len(slices), z.device)
            ctx.alpha = a if not is_tensor else None
            ctx.save_for_backward(p, alpha if is_tensor else None)
            return p

        def job(part):
            buf, buf2 = _scratch(z, z.shape[1], 2)
            for i in part:
                sl = slices[i]
                x = z[sl] * (_pick(a, sl) - 1.0)
                _entmax_rows(x.sub_(_row_max(x)), _pick(e, sl), p[sl], tol, max_iter, buf, buf2, shifted=True)

        _parallel(job, len(slices), z.device)
        ctx.alpha = a if not is_tensor else None
        ctx.save_for_backward(p, alpha if is_tensor else None)  # the input: double backward sees alpha
        return p

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p, a_t = ctx.saved_tensors
        a = a_t if a_t is not None else ctx.alpha
        need_alpha = a_t is not None and ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # double backward: differentiable formula
            dz, da = _entmax_backward_simple(p, g, a, need_alpha)
            return dz, da, None, None
        g = g.contiguous()
        dz = torch.empty_like(g)
        da = torch.empty_like(a_t) if need_alpha else None
        slices = list(_chunks(p.shape[0], p.shape[1], p.device))

        def job(part):
            (buf,) = _scratch(p, p.shape[1])
            for i in part:
                sl = slices[i]
                d = _entmax_backward_rows(p[sl], g[sl], _pick(a, sl), dz[sl], need_alpha, buf)
                if need_alpha:
                    da[sl] = d

        _parallel(job, len(slices), p.device)
        return dz, da, None, None
