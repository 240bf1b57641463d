"""Memory-efficient attention core `Sep(beta q k^T + mask) v` for the sparse separation maps.

The scores are produced, separated and consumed block by block (blocks of query rows of about
`_CHUNK_ELEMS` scores), and only the per-row thresholds `tau` (and normalisers) are saved: the
backward pass recomputes each block's scores with one matmul and its weights from `tau` in one
elementwise pass (`p = (x - tau)_+^(1/(alpha-1)) / norm`), the flash-attention idea applied to
sparsemax / entmax (Peters et al. 2019; Correia et al. 2019). Memory is O(rows) instead of
O(rows * keys) and every intermediate stays in cache on CPU. The scales beta and alpha - 1 ride on
the score matmuls for a float beta and alpha (`q_scale`, BLAS's alpha); otherwise they are folded into the
(small) queries (a tensor beta with a float alpha before the core, by the product that is also the queries'
grouping copy, autograd taking d/dbeta; for a tensor alpha inside it, d/dbeta read off `dq`,
`sum <d/d(qk^T) k, q>`), and the thresholds are solved for `x - max x` (float precision for large
scores), so a block costs two matmuls and the threshold iteration forward, five matmuls and a few
elementwise passes backward (four when short rows keep their weights: `_kept_weights`). Blocks of long rows
with small supports (`_READOUT_MAX`, `_BACKWARD_MAX`) replace the matmuls with the weights by sums over the
supports (forward: one matmul left; backward: one).
On CPU the row work of a block (row maxima, thresholds, normalisers, weights; backward: weights, `ds`,
d/dalpha) is one call of the fused C++ kernels (`hopformer.functional._native`) when they are built,
else the torch-op kernels of `_separation_kernels` (`set_kernel_path` chooses). Rows of fewer than
`_TILE_MAX` keys take the tile kernels: the block is computed transposed, `k q^T`, and 16 rows are
separated together, one per vector lane (forward; backward for a general alpha).
In eager mode the forward and backward run through a plain autograd function (`_EagerCore`); under
`torch.compile` through the `torch.library` custom ops `_forward_op` / `_backward_op` (opaque nodes).
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hopformer.functional._separation_kernels import (
    _MAX_NEWTON,
    _default_tol,
    _entmax_backward_rows,
    _entmax_rows,
    _entmax_weights_and_gppr,
    _native_kernels,
    _parallel,
    _reference,
    _row_max,
    _sparsemax_backward_rows,
    _sparsemax_rows,
    get_kernel_path,
)

_CHUNK_ELEMS = 1 << 18
_CHUNK_ELEMS_GPU = 1 << 25
# CPU blocks of rows of at least _LONG_ROW scores: at least _MIN_BLOCK_ROWS rows (up to _MAX_BLOCK_ELEMS
# scores). Thin blocks paid their fixed cost (a dozen torch calls, thin matmuls) too often: fwd+bwd at
# L = 4096 / 8192 took about 0.87 / 0.75x the time with 256-row blocks instead of 64 / 32 rows
# (`benchmarks/separation.py --sweep-chunk`).
_LONG_ROW = 2048
_MIN_BLOCK_ROWS = 256
_MAX_BLOCK_ELEMS = 1 << 21
_MIN_UNITS = 8  # backward: below this many group units, each unit is split into pieces
_PIECES = 4
# Rows of fewer than _TILE_MAX keys go through the tile kernels (`_native/tiles.cpp`): the block is computed
# transposed (`k q^T`, keys x queries) and _LANES rows are separated together, one per vector lane.
_TILE_MAX = 256
_LANES = 16
# Blocks of long rows whose supports hold at most these shares of their scores read out (forward) and
# backpropagate (backward) through the supports only (`native.readout_support`, `native.backward_support`) instead
# of the dense matmuls with the weights. Rows of 1024 scores (d = 32): the read-out on the supports took the dense
# matmul's time at about a tenth of the scores, the backward on them about 0.9x the dense backward's at a quarter
# (alpha = 1.3 at L = 256), 0.15-0.4x on sparsemax and 1.5-entmax supports.
_READOUT_MAX = 0.1
_BACKWARD_MAX = 0.3


def _block_rows(groups: int, n: int, m: int, device: torch.device, lanes: int = 1) -> Tuple[int, int]:
    """`(groups per block, rows per block)`: whole groups per block when a group's `n x m` scores fit
    in `_CHUNK_ELEMS` (the number of blocks rounded, so sizes are balanced and no tiny last block
    pays a whole block's fixed cost: at most 1.5x `_CHUNK_ELEMS` scores), else row slices of one group
    (on CPU, rows of `_LONG_ROW` scores or more: at least `_MIN_BLOCK_ROWS` rows within `_MAX_BLOCK_ELEMS`)."""
    m = max(m, 1)
    per = max(1, (_CHUNK_ELEMS if device.type == "cpu" else _CHUNK_ELEMS_GPU) // m)
    if device.type == "cpu" and m >= _LONG_ROW and not _reference():
        per = max(per, min(_MIN_BLOCK_ROWS, _MAX_BLOCK_ELEMS // m))
    if per < n:  # row slices: whole tiles of `lanes` rows
        return 1, max(lanes, per // lanes * lanes)
    step = max(1, per // n)
    if not _reference():
        count = max(1, round(groups / step))
        step = -(-groups // count)
    return step, n


def _blocks(groups: int, n: int, m: int, device: torch.device, lanes: int = 1) -> Iterator[Tuple[slice, slice]]:
    """(group slice, row slice) blocks of about `_CHUNK_ELEMS` scores each (see `_block_rows`)."""
    step, per = _block_rows(groups, n, m, device, lanes)
    if per >= n:
        for g in range(0, groups, step):
            yield slice(g, min(groups, g + step)), slice(0, n)
    else:
        for g in range(groups):
            for r in range(0, n, per):
                yield slice(g, g + 1), slice(r, min(n, r + per))


def _rows_of(t: Optional[torch.Tensor], gs: slice, rs: slice) -> Optional[torch.Tensor]:
    """Block of a `(G, n or 1, ...)` tensor (rows broadcast when its row size is 1)."""
    if t is None:
        return None
    return t[gs] if t.shape[1] == 1 else t[gs, rs]


def _general(kind: str, a_t: Optional[Tensor], alpha_f: float) -> bool:
    """Whether the rows take the general alpha-entmax: any alpha but sparsemax and a float 1.5."""
    return kind == "entmax" and (a_t is not None or alpha_f != 1.5)


def _row_kernels(q: Tensor, m: int, kind: str, a_t: Optional[Tensor], alpha_f: float):
    """The fused C++ kernels for a call on rows of `m` scores, or None for the torch-op kernels."""
    return _native_kernels(q.device, m, general=_general(kind, a_t, alpha_f), tiles=m < _TILE_MAX)


def _use_tiles(native, m: int) -> bool:
    """Whether rows of `m` scores go through the tile kernels (see `_TILE_MAX`)."""
    return native is not None and m < _TILE_MAX and get_kernel_path() != "rows"


def _forward_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Optional[Tensor],
    a_t: Optional[Tensor],
    alpha_f: float,
    mask: Optional[Tensor],
    kind: str,
    tol: float,
    max_iter: int,
    q_scale: float = 1.0,
    weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward of `Sep(beta q k^T + mask) v` on `(G, n, d)`, `(G, m, d)`, `(G, m, dv)`.

    `beta` `(G, 1, 1)`, or None when `q` holds `(alpha - 1) beta q` already (a float alpha); `mask` additive
    `(G, n or 1, m)` or boolean (True = take part) or None;
    alpha the tensor `a_t` `(G, n or 1, 1)` or (when `a_t` is None) the float `alpha_f` in (1, 2];
    `kind` is "sparsemax" or "entmax". Returns `(out, tau, shift, norm)`: the read-out and the
    per-row threshold, row maximum and normaliser the backward recomputes the weights from.
    `q_scale`: a float the scores are multiplied by on the matmul (`beta (alpha - 1)` of a float beta, with `beta`
    None: the queries come unscaled, no query-sized product); `weights` `(G, m, n)` (see `_kept_weights`): filled
    with the weights, transposed, for the backward.
    Called directly in eager mode (`_EagerCore`); under `torch.compile` through the custom op `_forward_op`.
    """
    groups, n, _ = q.shape
    m = k.shape[1]
    out = q.new_empty(groups, n, v.shape[-1])
    tau = q.new_empty(groups, n, 1)
    shift = q.new_empty(groups, n, 1)  # row maxima: thresholds are solved for x - max (precision)
    norm = q.new_ones(groups, n, 1)
    alpha = a_t if a_t is not None else alpha_f
    native = _row_kernels(q, m, kind, a_t, alpha_f)
    if _use_tiles(native, m):
        _forward_tiles(native, q, k, v, beta, a_t, alpha_f, mask, kind, tol, max_iter, out, tau, shift, norm,
                       q_scale, weights)
        return out, tau, shift, norm
    qs, scale = _scaled_queries(q, beta, alpha, kind)
    blocks = list(_blocks(groups, n, m, q.device))

    def job(part):
        ws = _Workspace(q, n, m, 1 if native is not None else 4)  # native: the weights overwrite the scores
        for i in part:
            gs, rs = blocks[i]
            x = _row_scores(ws.get(0, (gs.stop - gs.start, rs.stop - rs.start, m)), gs, rs, k, qs, q_scale, mask, scale)
            rows = x.view(-1, m)
            if native is not None:  # one fused call: row maxima, thresholds, normalisers, weights (in place)
                a_rows = _alpha_rows(a_t, gs, rs)
                native.forward(rows, rows, kind, a_rows, alpha_f, tol, max_iter, tau[gs, rs].view(-1),
                               shift[gs, rs].view(-1), norm[gs, rs].view(-1))
                if not native.readout_support(x, v[gs], out[gs, rs], int(_READOUT_MAX * x.numel())):
                    torch.bmm(x, v[gs], out=out[gs, rs])
                continue
            p = ws.get(1, rows.shape)
            row_max = _row_max(rows)
            rows.sub_(row_max)
            shift[gs, rs] = row_max.reshape(x.shape[0], x.shape[1], 1)
            if kind == "sparsemax":
                t = _sparsemax_rows(rows, p, ws.bufs[2], shifted=True)
            else:
                a = _alpha_block(a_t, gs, rs) if a_t is not None else alpha
                t, nrm = _entmax_rows(rows, 1.0 / (a - 1.0), p, tol, max_iter, ws.bufs[2], ws.bufs[3], shifted=True)
                norm[gs, rs] = nrm.reshape(x.shape[0], x.shape[1], 1)
            tau[gs, rs] = t.reshape(x.shape[0], x.shape[1], 1)
            torch.bmm(p.view(x.shape), v[gs], out=out[gs, rs])

    _parallel(job, len(blocks), q.device)
    return out, tau, shift, norm


def _forward_tiles(native, q, k, v, beta, a_t, alpha_f, mask, kind, tol, max_iter, out, tau, shift, norm,
                   q_scale, weights) -> None:
    """`_forward_blocks` on the tile kernels: each block's scores transposed, `(alpha - 1) (beta k q^T + mask^T)`,
    in the workspace or, when kept, in `weights`."""
    groups, n, _ = q.shape
    m = k.shape[1]
    qs, scale = _scaled_queries(q, beta, a_t if a_t is not None else alpha_f, kind)
    blocks = list(_blocks(groups, n, m, q.device, _LANES))

    def job(part):
        ws = _Workspace(q, n, m, 1 if weights is None else 0, _LANES)
        for i in part:
            gs, rs = blocks[i]
            shape = (gs.stop - gs.start, m, rs.stop - rs.start)
            xt = _tile_scores(ws.get(0, shape) if weights is None else weights[gs], gs, rs, k, qs, q_scale, mask,
                              scale)  # kept weights: whole groups per block
            native.forward_tiles(xt, kind, _alpha_rows(a_t, gs, rs), alpha_f, tol, max_iter, tau[gs, rs].view(-1),
                                 shift[gs, rs].view(-1), norm[gs, rs].view(-1))
            torch.bmm(xt.transpose(1, 2), v[gs], out=out[gs, rs])

    _parallel(job, len(blocks), q.device)


# `torch.library` custom ops, so `torch.compile` treats the core as opaque nodes (the CPU worker threads stay
# out of the traced graph). Their schemas leave out the eager-only `weights` (the ops keep none).
_forward_op = torch.library.custom_op(
    "hopformer::separated_attention_forward", mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? beta, Tensor? a_t, float alpha_f, Tensor? mask, str kind, "
           "float tol, int max_iter, float q_scale) -> (Tensor, Tensor, Tensor, Tensor)",
)(_forward_blocks)


@_forward_op.register_fake
def _forward_fake(q, k, v, beta, a_t, alpha_f, mask, kind, tol, max_iter, q_scale):
    groups, n, _ = q.shape
    return q.new_empty(groups, n, v.shape[-1]), q.new_empty(groups, n, 1), q.new_empty(groups, n, 1), q.new_empty(groups, n, 1)


def _backward_blocks(
    g_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Optional[Tensor],
    a_t: Optional[Tensor],
    alpha_f: float,
    mask: Optional[Tensor],
    tau: Tensor,
    shift: Tensor,
    norm: Tensor,
    kind: str,
    need_beta: bool,
    need_alpha: bool,
    q_scale: float = 1.0,
    weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of `_forward_blocks`: `(dq, dk, dv, dbeta, dalpha)` (`dbeta` / `dalpha` empty when not
    asked for; with `beta` None, `dq` and `dk` are those of the queries as given, scaled by `q_scale` in the
    scores, and `dbeta` is empty).
    Closed-form Jacobian-vector products of Peters et al. 2019 (eq. 10) and, for alpha,
    Correia et al. 2019 (eq. 12-14), the weights recomputed per block from the saved thresholds, or read from
    `weights` when the forward kept them."""
    groups, n, _ = q.shape
    m = k.shape[1]
    need_alpha = a_t is not None and need_alpha
    alpha = a_t if a_t is not None else alpha_f
    native = _row_kernels(q, m, kind, a_t, alpha_f)
    # the tile backward for a general alpha (its powers run 16 rows a vector) or kept weights; sparsemax and
    # 1.5-entmax rows have no powers to take and their row backward from the scores streams through the block
    # faster (0.75x the tiles' time)
    tiles = weights is not None or (_use_tiles(native, m) and _general(kind, a_t, alpha_f))
    lanes = _LANES if tiles else 1
    qs, scale = _scaled_queries(q, beta if weights is None else None, alpha, kind)  # kept weights: qs unused
    dq = torch.empty_like(q)  # first d loss / d (q k^T) k, scaled by beta at the end
    # beta None: the scores are q_scale q k^T and the kernels' ds is d loss / d (scores / (alpha - 1)), so dq and dk
    # take q_scale / (alpha - 1) on their matmuls
    grad_scale = q_scale if beta is not None or scale is None else q_scale / scale
    blocks = list(_blocks(groups, n, m, q.device, lanes))
    g_out = g_out.contiguous()

    items = _units(blocks)
    owned = [True] * len(items)  # whether an item owns its groups (else: a piece with a private sum)
    if len(items) < _MIN_UNITS:  # few groups: pieces of a group run in parallel, with private sums
        pieces = [_split(unit, _PIECES) for unit in items]
        items = [piece for unit in pieces for piece in unit]
        owned = [len(unit) == 1 for unit in pieces for _ in unit]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dalpha = torch.empty_like(a_t) if need_alpha else None
    private: List[Optional[Tuple[torch.Tensor, ...]]] = [None] * len(items)

    def job(part):
        """Per item (consecutive blocks of one set of groups): writes its rows of dq and sums its
        share of dk, dv, dalpha; items own their groups (or, pieces, a private sum), so the
        result does not depend on the number of workers nor on who ran which item."""
        ws = _Workspace(q, n, m, 4, lanes)
        for u in part:
            gs = items[u][0][0]
            if not owned[u]:  # dk, dv: written by the first block (no zero fill of fresh memory)
                gk, gv = k.new_empty(k[gs].shape), v.new_empty(v[gs].shape)
                ga = a_t.new_zeros(a_t[gs].shape) if need_alpha else None
                private[u] = (gk, gv, ga)
            else:
                gk, gv = dk[gs], dv[gs]
                ga = dalpha[gs].zero_() if need_alpha else None
            for b, (gs, rs) in enumerate(items[u]):
                go = g_out[gs, rs]
                if tiles:
                    p3, ds3, da = _tile_block_grads(native, ws, gs, rs, k, v, qs, q_scale, go, mask, scale, kind, a_t,
                                                    alpha_f, (tau, shift, norm), need_alpha, weights)
                else:
                    x = _row_scores(ws.get(0, (gs.stop - gs.start, rs.stop - rs.start, m)), gs, rs, k, qs, q_scale,
                                    mask, scale)
                    if native is not None and _support_block_grads(native, ws, x, gs, rs, q, k, v, go, kind, a_t, alpha_f,
                                                                   (tau, shift, norm), need_alpha, b, dq, gk, gv, ga,
                                                                   grad_scale):
                        continue
                    p3, ds3, da = _row_block_grads(native, ws, gs, rs, x, v, go, kind, a_t, alpha_f, (tau, shift, norm),
                                                   need_alpha)
                _add_block_grads(b, p3, ds3, da, gs, rs, k, q, go, a_t, dq, gk, gv, ga, grad_scale)

    _parallel(job, len(items), q.device)
    if not all(owned):  # the pieces' private sums, in a fixed order: deterministic
        done = set()
        for item, sums in zip(items, private):
            if sums is None:
                continue
            gs = item[0][0]
            key = (gs.start, gs.stop)
            for total, part in zip((dk, dv, dalpha), sums):
                if part is not None:
                    if key in done:
                        total[gs] += part
                    else:
                        total[gs] = part
            done.add(key)
    dalpha = dalpha if dalpha is not None else q.new_empty(0)
    if beta is None:  # dq and dk took their scale on the matmuls (grad_scale)
        return dq, dk, dv, q.new_empty(0), dalpha
    # scores = beta q k^T: d/dbeta = sum <d/d(q k^T) k, q> per group; dq and dk take their beta in place
    dbeta = torch.linalg.vecdot(dq, q).sum(dim=1).view(-1, 1, 1) if need_beta else q.new_empty(0)
    return dq.mul_(beta), dk.mul_(beta), dv, dbeta, dalpha


def _row_scores(x, gs, rs, k, qs, q_scale, mask, scale) -> Tensor:
    """A block's scores into `x` `(groups, rows, m)`: `q_scale qs k^T` and the mask, i.e. `(alpha - 1) (beta q k^T +
    mask)` (forward, and recomputed alike in the backward)."""
    _matmul(qs[gs, rs], k[gs].transpose(1, 2), x, q_scale)
    return _add_mask(x, mask, gs, rs, scale)


def _tile_scores(xt, gs, rs, k, qs, q_scale, mask, scale) -> Tensor:
    """`_row_scores` transposed, into `xt` `(groups, m, rows)` (the tile kernels' layout)."""
    _matmul(k[gs], qs[gs, rs].transpose(1, 2), xt, q_scale)
    return _add_mask(xt, mask, gs, rs, scale, transposed=True)


def _support_block_grads(native, ws, x, gs, rs, q, k, v, go, kind, a_t, alpha_f, stats, need_alpha, b, dq, gk, gv,
                         ga, grad_scale: float) -> bool:
    """A block's rows of `dq` and its share of `gk`, `gv`, `ga` (as `_add_block_grads`) through the rows' supports,
    from its scores `x` (one C++ call, `native.backward_support`); False, with nothing done, when the supports
    hold more than `_BACKWARD_MAX` of the scores."""
    if b == 0:  # the unit's first block: its sums start here
        gk.zero_()
        gv.zero_()
    da = ws.get(3, (x.shape[0] * x.shape[1],)) if need_alpha else None
    tau, shift, norm = (t[gs, rs].reshape(-1) for t in stats)
    if not native.backward_support(x, go, q[gs, rs], k[gs], v[gs], dq[gs, rs], gk, gv, kind, _alpha_rows(a_t, gs, rs),
                                   alpha_f, tau, shift, norm, da, grad_scale, int(_BACKWARD_MAX * x.numel())):
        return False
    if da is not None:
        _add_dalpha(ga, da.view(x.shape[0], x.shape[1], 1), a_t, rs)
    return True


def _row_block_grads(native, ws, gs, rs, x, v, go, kind, a_t, alpha_f, stats, need_alpha):
    """A block's weights, d loss / d scores (both `(groups, rows, m)`) and d loss / d alpha per row (or None),
    from its scores `x` (`_row_scores`, overwritten) and d loss / d p `go v^T`: one fused C++ call, else the
    torch-op kernels."""
    tau, shift, norm = (t[gs, rs] for t in stats)
    shape = x.shape
    m = shape[2]
    x = x.view(-1, m)
    dp = ws.get(1, shape)
    torch.bmm(go, v[gs].transpose(1, 2), out=dp)
    dp = dp.view(-1, m)
    ds = ws.get(2, dp.shape)
    da = None
    if native is not None:  # weights (into x), ds and d loss / d alpha per row
        da = ws.get(3, (shape[0] * shape[1],)) if need_alpha else None
        native.backward(x, dp, ds, kind, _alpha_rows(a_t, gs, rs), alpha_f, tau.view(-1), shift.view(-1),
                        norm.view(-1), da)
        p = x
    elif kind == "sparsemax":
        p = x.sub_(shift.reshape(-1, 1)).sub_(tau.reshape(-1, 1)).relu_()
        _sparsemax_backward_rows(p, dp, ds, ws.bufs[3])
    else:
        a = _alpha_block(a_t, gs, rs) if a_t is not None else alpha_f
        p, gppr = _entmax_weights_and_gppr(x.sub_(shift.reshape(-1, 1)), a, tau.reshape(-1, 1), norm.reshape(-1, 1),
                                           ws.get(3, x.shape), ds)  # ds: free until filled below
        da = _entmax_backward_rows(p, dp, a, ds, need_alpha, gppr=gppr)
    return p.view(shape), ds.view(shape), da if need_alpha else None


def _tile_block_grads(native, ws, gs, rs, k, v, qs, q_scale, go, mask, scale, kind, a_t, alpha_f, stats, need_alpha,
                      weights=None):
    """A block's weights, d loss / d scores (both `(groups, rows, m)`, transposed views of the tile kernels'
    blocks) and d loss / d alpha per row (or None), from d loss / d p computed transposed (`v go^T`) and the
    block's scores (`_tile_scores`) or, when the forward kept them, its weights (`weights[gs]`, whole groups: no
    scores to recompute, one matmul of the block's five)."""
    shape = (gs.stop - gs.start, k.shape[1], rs.stop - rs.start)
    if weights is None:
        xt = _tile_scores(ws.get(0, shape), gs, rs, k, qs, q_scale, mask, scale)
        block_stats = [t[gs, rs].view(-1) for t in stats]
    else:
        xt, block_stats = weights[gs], [None, None, None]
    dpt = ws.get(1, shape)
    torch.bmm(v[gs], go.transpose(1, 2), out=dpt)
    dst = ws.get(2, shape)
    da = ws.get(3, (shape[0] * shape[2],)) if need_alpha else None
    native.backward_tiles(xt, dpt, dst, _alpha_rows(a_t, gs, rs), alpha_f, *block_stats, da, kind)
    return xt.transpose(1, 2), dst.transpose(1, 2), da


def _add_block_grads(b, p3, ds3, da, gs, rs, k, q, go, a_t, dq, gk, gv, ga, grad_scale: float) -> None:
    """From a block's weights `p3` and d loss / d scores `ds3` `(groups, rows, m)`: its rows of `dq`, and its
    share of `gk`, `gv` (written by the unit's first block, `b == 0`, else added) and `ga` (when `da` is given)."""
    if da is not None:
        _add_dalpha(ga, da.view(p3.shape[0], p3.shape[1], 1), a_t, rs)
    _matmul(ds3, k[gs], dq[gs, rs], grad_scale)
    if b == 0:
        torch.bmm(p3.transpose(1, 2), go, out=gv)
        _matmul(ds3.transpose(1, 2), q[gs, rs], gk, grad_scale)  # a tensor beta: times beta at the end
    else:
        gv.baddbmm_(p3.transpose(1, 2), go)
        gk.baddbmm_(ds3.transpose(1, 2), q[gs, rs], alpha=grad_scale)


_backward_op = torch.library.custom_op(
    "hopformer::separated_attention_backward", mutates_args=(),
    schema="(Tensor g_out, Tensor q, Tensor k, Tensor v, Tensor? beta, Tensor? a_t, float alpha_f, Tensor? mask, "
           "Tensor tau, Tensor shift, Tensor norm, str kind, bool need_beta, bool need_alpha, float q_scale) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)(_backward_blocks)


@_backward_op.register_fake
def _backward_fake(g_out, q, k, v, beta, a_t, alpha_f, mask, tau, shift, norm, kind, need_beta, need_alpha, q_scale):
    dbeta = beta.new_empty(beta.shape) if need_beta else q.new_empty(0)
    dalpha = a_t.new_empty(a_t.shape) if (need_alpha and a_t is not None) else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbeta, dalpha


def _setup_context(ctx, inputs, output, weights: Optional[Tensor] = None) -> None:
    q, k, v, beta, a_t, alpha_f, mask, kind, _, _, q_scale = inputs
    _, tau, shift, norm = output
    ctx.kind, ctx.alpha_f, ctx.q_scale = kind, alpha_f, q_scale
    ctx.save_for_backward(q, k, v, beta, a_t, mask, tau, shift, norm, weights)


def _input_grads(ctx, g_out, backward) -> tuple:
    """The gradients of the core's eleven inputs from `backward` (`_backward_op` or `_backward_blocks`, which
    reads the kept weights when the eager forward kept them)."""
    q, k, v, beta, a_t, mask, tau, shift, norm, weights = ctx.saved_tensors
    need_beta, need_alpha = ctx.needs_input_grad[3], a_t is not None and ctx.needs_input_grad[4]
    args = (g_out, q, k, v, beta, a_t, ctx.alpha_f, mask, tau, shift, norm, ctx.kind, need_beta, need_alpha,
            ctx.q_scale)
    dq, dk, dv, dbeta, dalpha = backward(*args) if weights is None else _backward_blocks(*args, weights=weights)
    return (dq, dk, dv, dbeta if need_beta else None, dalpha if need_alpha else None,
            None, None, None, None, None, None)


def _backward(ctx, g_out, g_tau, g_shift, g_norm):
    return _input_grads(ctx, g_out, _backward_op)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerCore(torch.autograd.Function):
    """The core in eager mode: the same forward and backward as the custom ops, called directly. Dispatching a
    custom op and its Python autograd wrapper (filling the schema's defaults, redispatching) cost about as much
    per call as SDPA's whole forward and backward on a small input; `torch.compile` takes the custom ops."""

    @staticmethod
    def forward(ctx, q, k, v, beta, a_t, alpha_f, mask, kind, tol, max_iter, q_scale):
        weights = _kept_weights(q, k, kind, a_t, alpha_f, v.shape[-1]) if any(ctx.needs_input_grad[:5]) else None
        out, tau, shift, norm = _forward_blocks(q, k, v, beta, a_t, alpha_f, mask, kind, tol, max_iter, q_scale,
                                                weights)
        _setup_context(ctx, (q, k, v, beta, a_t, alpha_f, mask, kind, tol, max_iter, q_scale),
                       (out, tau, shift, norm), weights)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out):
        return _input_grads(ctx, g_out, _backward_blocks)


def _matmul(a: Tensor, b: Tensor, out: Tensor, scale: float) -> Tensor:
    """`out = scale (a @ b)`, batched: the scale rides on the matmul (no pass of its own)."""
    if scale == 1.0:
        return torch.bmm(a, b, out=out)
    return out.baddbmm_(a, b, beta=0.0, alpha=scale)


def _kept_weights(q: Tensor, k: Tensor, kind: str, a_t: Optional[Tensor], alpha_f: float, dv: int) -> Optional[Tensor]:
    """A `(G, m, n)` tensor for the forward to keep its weights in (transposed, as the tile kernels write them), or
    None. Kept on the tile path when whole groups make a block and the weights take no more memory than q, k, v
    together (memory stays O(inputs)): the backward then reads them instead of recomputing the scores, one of
    its five matmuls (at L = 65 the core's forward and backward took 0.90-0.96x the time)."""
    groups, n, d = q.shape
    m = k.shape[1]
    if not _use_tiles(_row_kernels(q, m, kind, a_t, alpha_f), m) or n * m > n * d + m * (d + dv):
        return None
    if _block_rows(groups, n, m, q.device, _LANES)[1] != n:
        return None
    return q.new_empty(groups, m, n)


def _scaled_queries(q, beta, alpha, kind: str):
    """`((alpha - 1) beta q, alpha - 1)`: folding the scales into the (small) queries saves full passes over
    each block of scores (for sparsemax the scale is 1 and None is returned; `beta` None: `q` as given, its
    scale taken before the core or on the matmuls, `q_scale`). One query-sized tensor: the factor is formed on
    the small `beta` / `alpha` first (a second query-sized product cost as much as a block's matmuls, most of it
    page faults of the fresh allocation)."""
    scale = None if kind == "sparsemax" else alpha - 1.0
    if beta is None:
        return q, scale
    return (q * beta, None) if scale is None else (q * (beta * scale), scale)


def _units(blocks: List[Tuple[slice, slice]]) -> List[List[Tuple[slice, slice]]]:
    """Consecutive blocks grouped by their group slice: the backward's units of work (one unit owns
    its groups of dk, dv, dalpha, so no worker needs a private copy of them)."""
    units: List[List[Tuple[slice, slice]]] = []
    for gs, rs in blocks:
        if units and units[-1][0][0] == gs:
            units[-1].append((gs, rs))
        else:
            units.append([(gs, rs)])
    return units


def _split(unit: List[Tuple[slice, slice]], pieces: int) -> List[List[Tuple[slice, slice]]]:
    """`unit` cut into at most `pieces` runs of consecutive blocks."""
    count = min(pieces, len(unit))
    bounds = [round(i * len(unit) / count) for i in range(count + 1)]
    return [unit[bounds[i]: bounds[i + 1]] for i in range(count)]


class _Workspace:
    """`count` flat buffers of one block's size, reused by every block (no per-block allocation)."""

    def __init__(self, like: torch.Tensor, n: int, m: int, count: int, lanes: int = 1):
        step, per = _block_rows(like.shape[0], n, m, like.device, lanes)
        size = min(step * per * m, like.shape[0] * n * m)
        self.bufs = [like.new_empty(size) for _ in range(count)]

    def get(self, i: int, shape) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        return self.bufs[i][:numel].view(shape)


def _add_dalpha(ga: torch.Tensor, da: torch.Tensor, a_t: torch.Tensor, rs: slice) -> None:
    """Add a block's d loss / d alpha per row `da` `(groups, rows, 1)` to its groups' `ga` (shaped like
    `a_t`: one alpha per row, or one shared by the rows)."""
    if a_t.shape[1] == 1:
        ga += da.sum(dim=1, keepdim=True)
    else:
        ga[:, rs] += da


def _alpha_block(a_t: torch.Tensor, gs: slice, rs: slice) -> torch.Tensor:
    """A block's alpha per row, `(groups * rows, 1)`."""
    return _rows_of(a_t, gs, rs).expand(gs.stop - gs.start, rs.stop - rs.start, 1).reshape(-1, 1)


def _alpha_rows(a_t: Optional[torch.Tensor], gs: slice, rs: slice) -> Optional[torch.Tensor]:
    """The native kernels' alpha per row of a block, flat and contiguous, or None (a float alpha)."""
    return None if a_t is None else _alpha_block(a_t, gs, rs).reshape(-1).contiguous()


def _add_mask(x: torch.Tensor, mask: Optional[torch.Tensor], gs: slice, rs: slice, scale=None,
              transposed: bool = False) -> torch.Tensor:
    """Apply a block of `mask` to the scores `x`, an additive mask multiplied by `scale` (alpha - 1);
    `transposed`: `x` holds the block's scores transposed (keys x queries)."""
    if mask is None:
        return x
    block = _rows_of(mask, gs, rs)
    flip = (lambda t: t.transpose(1, 2)) if transposed else (lambda t: t)  # noqa: E731
    if block.dtype == torch.bool:
        return x.masked_fill_(~flip(block), float("-inf"))
    if scale is None:
        return x.add_(flip(block))
    if isinstance(scale, float):
        return x.add_(flip(block), alpha=scale)
    return x.addcmul_(flip(block), flip(_rows_of(scale, gs, rs)))


def _lead_shape(*shapes: torch.Size) -> torch.Size:
    """`torch.broadcast_shapes` with a shortcut for equal shapes (the usual case; the general one is Python
    code, about 10 us a call)."""
    return shapes[0] if all(s == shapes[0] for s in shapes) else torch.broadcast_shapes(*shapes)


def _groups(t: torch.Tensor, lead: List[int], tail: Tuple[int, ...]) -> torch.Tensor:
    """Broadcast `t` to `lead + tail` (tail entries -1 keep t's own size) and flatten the lead dims."""
    tail_t = t.shape[len(t.shape) - len(tail):] if t.dim() >= len(tail) else (1,) * (len(tail) - t.dim()) + t.shape
    t = t.reshape(tail_t) if t.dim() < len(tail) else t
    shape = list(lead) + [s if s != -1 else ts for s, ts in zip(tail, tail_t)]
    if list(t.shape) != shape:  # (an expand to its own shape is still one more autograd node)
        t = t.expand(shape)
    return t.reshape(-1, *shape[len(lead):])


def separated_attention_core(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    beta: Union[float, torch.Tensor],
    alpha: Union[float, torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    tol: Optional[float] = None,
    max_iter: int = _MAX_NEWTON,
) -> torch.Tensor:
    """Block-wise `entmax_alpha(beta q k^T + mask) v` for alpha in (1, 2] (see module docstring).

    Shapes as in `hopformer.functional.separation.separated_attention`, which validates them.
    """
    lead = list(_lead_shape(query.shape[:-2], keys.shape[:-2], values.shape[:-2]))
    n, m = query.shape[-2], keys.shape[-2]
    dtype = query.dtype
    if n == 0 or m == 0 or 0 in lead:  # nothing to attend to: zeros (an all-masked row reads out 0)
        zero = (query.sum() + keys.sum() + values.sum()) * 0.0
        return zero.to(values.dtype).expand(*lead, n, values.shape[-1]).clone()
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=query.device.type, enabled=False):
        k = _groups(keys.to(cdtype), lead, (m, keys.shape[-1])).contiguous()
        v = _groups(values.to(cdtype), lead, (m, values.shape[-1])).contiguous()
        if mask is not None:
            mask = _groups(mask if mask.dtype == torch.bool else mask.to(cdtype), lead, (-1, m)).contiguous()
        q_scale = 1.0
        if isinstance(alpha, torch.Tensor):  # the core scales the queries by beta and alpha - 1 per row
            a_t, a_f, kind = _groups(alpha.to(cdtype), lead, (-1, 1)).contiguous(), 0.0, "entmax"
            q = _groups(query.to(cdtype), lead, (n, query.shape[-1])).contiguous()
            if isinstance(beta, torch.Tensor):
                b = _groups(beta.to(cdtype), lead, (1, 1)).contiguous()
            else:
                b = torch.full((q.shape[0], 1, 1), float(beta), dtype=cdtype, device=q.device)
        else:  # a float alpha: the core takes beta (alpha - 1) outside the kernels
            a_t, a_f, b = None, float(alpha), None
            kind = "sparsemax" if a_f == 2.0 else "entmax"
            factor = 1.0 if kind == "sparsemax" else a_f - 1.0
            if isinstance(beta, torch.Tensor):  # on the queries: that product is their grouping copy (autograd: dbeta)
                query, q_scale = query.to(cdtype) * (beta.to(cdtype) * factor), 1.0
            else:  # on the score matmuls (q_scale): no query-sized product forward nor backward
                query, q_scale = query.to(cdtype), float(beta) * factor
            q = _groups(query, lead, (n, query.shape[-1])).contiguous()
        if tol is None:
            tol = _default_tol(cdtype)
        args = (q, k, v, b, a_t, a_f, mask, kind, float(tol), int(max_iter), q_scale)
        if torch.compiler.is_compiling():
            out = _forward_op(*args)[0]
        elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, b, a_t)):
            out = _EagerCore.apply(*args)
        else:  # no autograd record (and no weights kept for a backward)
            out = _forward_blocks(*args)[0]
    return out.reshape(*lead, n, values.shape[-1]).to(dtype)
