"""Hilbert-curve token order for image and video grids (SPEC §4 Helpers).

Attention blocks are runs of consecutive tokens. In raster order a run of 64
tokens of a video is a thin strip of one row; along a space-filling curve it is
a compact patch (a 4 x 4 x 4 cube where the grid allows), whose tokens look
alike. That raises block self-similarity and lets the block prediction keep
fewer blocks at the same error. Reorder Q, K and V, attend, restore the output:

    from sparge import hilbert
    q, k, v = (hilbert.reorder(t, (T, H, W), offset=n_text) for t in (q, k, v))
    out = hilbert.restore(sparge.attn(q, k, v), (T, H, W), offset=n_text)
    # or in one call: hilbert.hilbert_attn(q, k, v, (T, H, W), offset=n_text)

Method: a generalized Hilbert curve for boxes of any size, in the spirit of
"gilbert" (Červený's generalized Hilbert curve), written here for 3-D with an
explicit cost search. A box is given by its extents (w, h, d) along a major
axis a and two minor axes b, c (h >= d). Its curve starts at the corner
(0, 0, 0) and ends at (w-1, 0, 0), the far corner along a, so consecutive
sub-boxes join with a unit step. Recursion, by shape:

- a line (h = d = 1): walk along a;
- long in a (2w > 3h): two halves along a;
- flat (3h > 4d): the 2-D Hilbert step in the (a, b) plane, c carried along:
  up the b half of the first a half, across the whole far b half, back down
  the b half of the second a half (3 sub-boxes);
- otherwise the 3-D Hilbert step over the eight octants, visited
  000, 01*, *01, 11*, 100 (5 sub-boxes; the starred octant pairs are merged).

Every sub-box gets its own major axis (the direction it must cross) and
re-enters the recursion, so thin grids such as (1, 64, 64) or (13, 60, 90)
are cut into near-cubes. A side of odd length can make a corner-to-corner
path impossible (colour parity), so each split point is chosen among the half
and its +-1, +-2 neighbours: the choice minimises the excess step length
sum(|step|_1 - 1) of the whole box plus how far its end lands from the corner
it should reach (found exactly by the recursion, memoised per box shape);
among equal ones, parts divisible by 4 or 8 and then balanced parts win, so
runs of 64 or 128 tokens fill whole 4 x 4 x 4 or 8 x 4 x 4 sub-boxes more
often. A degenerate box of major length 1 is walked through its own plane.
A 2-D grid (H, W) is the 3-D grid (1, H, W).

Measured (tests/test_hilbert.py): power-of-two sides and the video grids
tried ((8, 24, 24), (7, 20, 30), (13, 60, 90), (21, 45, 80)) give unit
steps only; every 2-D grid up to 24 x 24 has at most one diagonal step (only
where parity forces it), every 3-D grid up to 7^3 at most 3; no step is
longer than |step|_1 = 2. The 64-token runs of (13, 60, 90) span ~5 x 5 x 5
boxes (raster: 1 x 2.3 x 82).

The permutation is built once per grid on the CPU (a few ms for images,
0.1-1 s for video grids of 10^5 tokens, once per process), cached per (grid,
device), and applied with one ``index_select``. Under ``torch.compile``
(``fullgraph=True``, dynamic sequence lengths included) the gather is one
opaque custom op (``sparge::hilbert_permute``, with autograd: its backward is
the inverse permutation), so the curve construction is never traced. For CUDA
graph capture, call once before capturing so the index is already on the GPU.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch

__all__ = ["curve_coords", "hilbert_attn", "permutation", "reorder", "restore"]

# ---------------------------------------------------------------- the curve

# A sub-box: (origin in the parent's local coordinates, for each of its own axes
# a', b', c' the parent axis and sign it runs along, its extents (w', h', d')).
_Child = tuple[tuple[int, int, int], tuple[tuple[int, int], ...], tuple[int, int, int]]


def _child(origin, major, m1, m2) -> _Child:
    """A sub-box from (axis, sign, length) triples; the longer minor becomes b'."""
    if m2[2] > m1[2]:
        m1, m2 = m2, m1
    return origin, ((major[0], major[1]), (m1[0], m1[1]), (m2[0], m2[1])), (major[2], m1[2], m2[2])


def _to_parent(child: _Child, p) -> tuple[int, int, int]:
    """A point of the child's local frame in the parent's local frame."""
    out = list(child[0])
    for k, (axis, sign) in enumerate(child[1]):
        out[axis] += sign * p[k]
    return tuple(out)


_SPREAD = 2  # split points tried: the half +- this


def _twos(n: int) -> int:
    """How many times 2 divides n, at most 3."""
    return min((n & -n).bit_length() - 1, 3)


@functools.cache
def _splits(*sides):
    """Split-point tuples for the given sides, in order of preference: parts
    divisible by larger powers of two first (so runs of 64 or 128 tokens fill
    4 x 4 x 4 or 8 x 4 x 4 sub-boxes more often), then the most balanced."""
    cands = [[s for s in range(x // 2 - _SPREAD, x // 2 + _SPREAD + 1) if 1 <= s <= x - 1] for x in sides]
    return sorted(itertools.product(*cands),
                  key=lambda t: (-sum(min(_twos(s), _twos(x - s)) for s, x in zip(t, sides)),
                                 sum(abs(2 * s - x) for s, x in zip(t, sides))))


def _evaluate(children, limit):
    """(excess step length inside and between the children, end point); stops
    early (end None) once the cost reaches ``limit``."""
    cost, end = 0, None
    for child in children:
        c, e, _ = _plan(*child[2])
        if end is not None:
            o = child[0]
            cost += abs(end[0] - o[0]) + abs(end[1] - o[1]) + abs(end[2] - o[2]) - 1
        cost += c
        if cost >= limit:
            return cost, None
        end = _to_parent(child, e)
    return cost, end


def _long(w, h, d, a2):
    """Long in a: two halves along a."""
    return (_child((0, 0, 0), (0, 1, a2), (1, 1, h), (2, 1, d)),
            _child((a2, 0, 0), (0, 1, w - a2), (1, 1, h), (2, 1, d)))


def _flat(w, h, d, a2, b2):
    """Flat: the 2-D Hilbert step in the (a, b) plane, c carried along."""
    return (_child((0, 0, 0), (1, 1, b2), (0, 1, a2), (2, 1, d)),
            _child((0, b2, 0), (0, 1, w), (1, 1, h - b2), (2, 1, d)),
            _child((w - 1, b2 - 1, 0), (1, -1, b2), (0, -1, w - a2), (2, 1, d)))


def _cube(w, h, d, a2, b2, c2):
    """The 3-D Hilbert step: octants 000, 01*, *01, 11*, 100 (a, b, c bits)."""
    return (_child((0, 0, 0), (1, 1, b2), (0, 1, a2), (2, 1, c2)),
            _child((0, b2, 0), (2, 1, d), (0, 1, a2), (1, 1, h - b2)),
            _child((0, b2 - 1, d - 1), (0, 1, w), (1, -1, b2), (2, -1, d - c2)),
            _child((w - 1, b2, d - 1), (2, -1, d), (0, -1, w - a2), (1, 1, h - b2)),
            _child((w - 1, b2 - 1, 0), (1, -1, b2), (0, -1, w - a2), (2, 1, c2)))


@functools.cache
def _plan(w: int, h: int, d: int):
    """The curve of a w x h x d box (h >= d): (cost, end, children).

    cost: sum over steps of (L1 length - 1), 0 when every step is a unit step.
    end: where the curve actually ends (the target is (w-1, 0, 0)).
    children: sub-boxes in visiting order; () means a straight line along a.
    """
    if h == 1 and d == 1:
        return 0, (w - 1, 0, 0), ()
    if w == 1:
        # Start and target coincide: no path can do it. Either walk the (b, c)
        # plane towards the far end of b, or (d >= 2) go out along b at c = 0
        # and come back through the rest, ending next to the start.
        options = [(_child((0, 0, 0), (1, 1, h), (2, 1, d), (0, 1, 1)),)]
        if d >= 2:
            options.append((_child((0, 0, 0), (1, 1, h), (0, 1, 1), (2, 1, 1)),
                            _child((0, h - 1, 1), (1, -1, h), (2, 1, d - 1), (0, 1, 1))))
    else:
        if 2 * w > 3 * h:
            build, sides = _long, (w,)
        elif 3 * h > 4 * d:
            build, sides = _flat, (w, h)
        else:
            build, sides = _cube, (w, h, d)
        options = (build(w, h, d, *split) for split in _splits(*sides))
    # colour parity: a path of unit steps from corner to target needs w even or h*d odd
    bound = 1 if w % 2 == 1 and (h * d) % 2 == 0 else 0
    best = None
    for children in options:  # the preferred first
        cost, end = _evaluate(children, math.inf if best is None else best[0])
        if end is None:
            continue  # no better than the best so far
        score = cost + abs(end[0] - (w - 1)) + abs(end[1]) + abs(end[2])
        if best is None or score < best[0]:
            best = (score, cost, end, children)
            if score <= bound:
                break  # nothing can do better
    return best[1:]


def _coords(w: int, h: int, d: int, memo) -> torch.Tensor:
    """[w*h*d, 3] int64: the local (a, b, c) coordinates of the box's curve."""
    key = (w, h, d)
    if key not in memo:
        _, _, children = _plan(w, h, d)
        if not children:
            out = torch.zeros(w, 3, dtype=torch.int64)
            out[:, 0] = torch.arange(w)
        else:
            parts = []
            for origin, axes, size in children:
                rot = torch.zeros(3, 3, dtype=torch.int64)  # child axis k -> parent axis, signed
                for k, (axis, sign) in enumerate(axes):
                    rot[k, axis] = sign
                parts.append(_coords(*size, memo) @ rot + torch.tensor(origin))
            out = torch.cat(parts)
        memo[key] = out
    return memo[key]


def curve_coords(grid: Sequence[int]) -> torch.Tensor:
    """[N, len(grid)] int64: the grid coordinates of the curve's cells, in order."""
    grid = _check_grid(grid)
    sizes = (1,) * (3 - len(grid)) + grid
    # major axis: the longest (the last on ties, so a square image goes along W)
    order = sorted(range(3), key=lambda i: (-sizes[i], -i))
    local = _coords(*(sizes[i] for i in order), {})
    g = torch.empty_like(local)
    for k, axis in enumerate(order):
        g[:, axis] = local[:, k]
    return g[:, 3 - len(grid):].contiguous()


@functools.lru_cache(maxsize=64)
def _cpu_permutation(grid: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = curve_coords(grid)
    strides = torch.tensor([math.prod(grid[i + 1:]) for i in range(len(grid))], dtype=torch.int64)
    perm = (g * strides).sum(dim=1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return perm, inv


# ---------------------------------------------------------------- arguments

def _check_grid(grid) -> tuple[int, ...]:
    if isinstance(grid, torch.Size):
        grid = tuple(grid)
    if not isinstance(grid, (tuple, list)):
        raise TypeError(f"grid: expected a tuple (H, W) or (T, H, W) of ints, got {type(grid).__name__}")
    if len(grid) not in (2, 3):
        raise ValueError(f"grid: expected 2 or 3 sizes, (H, W) or (T, H, W), got {len(grid)}")
    for n in grid:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"grid: sizes must be ints, got {grid!r}")
        if n < 1:
            raise ValueError(f"grid: sizes must be positive, got {grid!r}")
    return tuple(int(n) for n in grid)


def _device(device) -> torch.device:
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _seq_dim(x, layout: str, name: str = "x") -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"layout: expected 'bhsd' or 'bshd', got {layout!r}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor ({'[B, H, S, D]' if layout == 'bhsd' else '[B, S, H, D]'}), "
                         f"got shape {tuple(x.shape)}")
    return 2 if layout == "bhsd" else 1


def _check_offset(offset, n: int, seq: int, what: str = "x") -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset: expected an int, got {type(offset).__name__}")
    if offset < 0 or offset + n > seq:
        raise ValueError(f"offset: the grid's {n} tokens at [{offset}, {offset + n}) do not fit "
                         f"the sequence of {what} (length {seq})")
    return offset


# ---------------------------------------------------------------- public API

@functools.lru_cache(maxsize=128)
def _permutation_on(grid: tuple[int, ...], device: torch.device):
    perm, inv = _cpu_permutation(grid)
    return perm.to(device), inv.to(device)


def permutation(grid, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hilbert order of a (H, W) or (T, H, W) grid: ``(perm, inv)``, int64 [N].

    ``perm[i]`` is the raster (row-major) index of the token at curve position
    i; ``inv`` is its inverse (``inv[perm[i]] == i``). Cached per (grid, device):
    the same tensors come back on every call; do not modify them."""
    return _permutation_on(_check_grid(grid), _device(device))


@functools.lru_cache(maxsize=256)
def _full_index(grid: tuple[int, ...], device: torch.device, offset: int, seq: int, inverse: bool) -> torch.Tensor:
    """Index over the whole sequence: identity outside [offset, offset + N)."""
    perm, inv = _permutation_on(grid, device)
    p = inv if inverse else perm
    if offset == 0 and p.numel() == seq:
        return p
    idx = torch.arange(seq, dtype=torch.int64, device=device)
    idx[offset:offset + p.numel()] = p + offset
    return idx


def _permute_eager(x: torch.Tensor, grid: tuple[int, ...], dim: int, offset: int, inverse: bool) -> torch.Tensor:
    return x.index_select(dim, _full_index(grid, x.device, offset, x.shape[dim], inverse))


# Under torch.compile the permutation is one opaque op: the index is built (or
# taken from the cache) when the op runs, never traced, and the sequence length
# may be symbolic. Its backward is the inverse permutation.
@torch.library.custom_op("sparge::hilbert_permute", mutates_args=())
def _permute_op(x: torch.Tensor, grid: list[int], dim: int, offset: int, inverse: bool) -> torch.Tensor:
    return _permute_eager(x, tuple(grid), dim, offset, inverse)


@_permute_op.register_fake
def _permute_fake(x, grid, dim, offset, inverse):
    return x.new_empty(x.shape)  # index_select's output: contiguous


def _permute_setup(ctx, inputs, output):
    ctx.args = inputs[1:]


def _permute_backward(ctx, grad):
    grid, dim, offset, inverse = ctx.args
    return _permute_op(grad, grid, dim, offset, not inverse), None, None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


def _permute(x: torch.Tensor, dim: int, grid: tuple[int, ...], offset: int, inverse: bool) -> torch.Tensor:
    """x with the grid's tokens along ``dim`` at [offset, offset + N) permuted
    (``inverse``: put back); one gather, a new tensor (x itself for one token)."""
    if math.prod(grid) == 1:
        return x
    if torch.compiler.is_compiling():
        return _permute_op(x, list(grid), dim, offset, inverse)
    return _permute_eager(x, grid, dim, offset, inverse)  # eager: no dispatcher round trip


def _apply(x, grid, offset, layout, inverse: bool):
    dim = _seq_dim(x, layout)
    grid = _check_grid(grid)
    offset = _check_offset(offset, math.prod(grid), x.shape[dim])
    return _permute(x, dim, grid, offset, inverse)


def reorder(x: torch.Tensor, grid, *, offset: int = 0, layout: str = "bhsd") -> torch.Tensor:
    """Put the ``prod(grid)`` visual tokens at sequence positions
    ``[offset, offset + N)`` of ``x`` in Hilbert order; other tokens (text before
    or after) stay where they are. ``x`` is ``[B, H, S, D]`` ("bhsd") or
    ``[B, S, H, D]`` ("bshd"); the visual tokens are in raster order. Returns
    a new contiguous tensor (one ``index_select``; ``x`` itself for a 1-token grid)."""
    return _apply(x, grid, offset, layout, inverse=False)


def restore(x: torch.Tensor, grid, *, offset: int = 0, layout: str = "bhsd") -> torch.Tensor:
    """The inverse of :func:`reorder`: visual tokens back in raster order."""
    return _apply(x, grid, offset, layout, inverse=True)


def _reorder_mask(mask: torch.Tensor, grid, offset: int, lq: int, lk: int) -> torch.Tensor:
    """An SDPA attn_mask (broadcastable to [B, H, Lq, Lk]) in the new order."""
    if mask.dim() >= 1 and mask.shape[-1] == lk:
        mask = _permute(mask, mask.dim() - 1, grid, offset, False)
    if mask.dim() >= 2 and mask.shape[-2] == lq:
        mask = _permute(mask, mask.dim() - 2, grid, offset, False)
    return mask


def hilbert_attn(q, k, v, grid, *, offset: int = 0, layout: str = "bhsd", **attn_kwargs):
    """``sparge.attn`` on Hilbert-reordered tokens, output back in raster order.

    The grid's tokens sit at ``[offset, offset + N)`` of the query, key and value
    sequences alike (self-attention over text + video, say). ``attn_mask`` is
    reordered along its query and key dimensions, ``key_padding_mask`` along
    its key dimension; ``lse`` (``return_lse``) is
    restored too; stats are order-free. Non-causal only: reordering breaks the
    causal order, so ``is_causal=True`` raises ``ValueError``."""
    from .functional import attn

    if attn_kwargs.get("is_causal", False):
        raise ValueError("is_causal: Hilbert reordering changes the token order, so causal attention "
                         "is not supported; use is_causal=False")
    grid = _check_grid(grid)
    n = math.prod(grid)
    for name, t in (("q", q), ("k", k), ("v", v)):
        dim = _seq_dim(t, layout, name)
        _check_offset(offset, n, t.shape[dim], name)
    q2, k2, v2 = (reorder(t, grid, offset=offset, layout=layout) for t in (q, k, v))
    dim = _seq_dim(q, layout)
    mask = attn_kwargs.get("attn_mask")
    if isinstance(mask, torch.Tensor):
        attn_kwargs["attn_mask"] = _reorder_mask(mask, grid, offset, q.shape[dim], k.shape[dim])
    kpad = attn_kwargs.get("key_padding_mask")  # [B, Lk] or [Lk]
    if isinstance(kpad, torch.Tensor) and kpad.dim() >= 1 and kpad.shape[-1] == k.shape[dim]:
        attn_kwargs["key_padding_mask"] = _permute(kpad, kpad.dim() - 1, grid, offset, False)
    res = attn(q2, k2, v2, layout=layout, **attn_kwargs)
    if isinstance(res, torch.Tensor):
        return restore(res, grid, offset=offset, layout=layout)
    out = [restore(res[0], grid, offset=offset, layout=layout)]
    if attn_kwargs.get("return_lse", False):
        out.append(_permute(res[1], 2, grid, offset, True))  # lse: [B, Hq, Lq] in both layouts
    out.extend(res[len(out):])
    return tuple(out)
