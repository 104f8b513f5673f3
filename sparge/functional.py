"""The SDPA-compatible API: argument checks, hyperparameter handling, fallbacks.

``attn`` keeps the parameter names and order of
``torch.nn.functional.scaled_dot_product_attention``; sparge's own options are
keyword-only. Bad input raises ValueError/TypeError naming the argument; valid
input that sparge cannot run natively goes to torch SDPA with a once-per-reason
warning and a counter (``fallback_counts()``, shared with the integrations).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import _fallback, _lib, _ops, reference
from . import config as _config
from ._fallback import fallback_counts, reset_fallback_counts

__all__ = ["attn", "predict", "block_sparse_attn", "block_shape", "fallback_counts", "reset_fallback_counts"]

Hyper = Union[float, torch.Tensor]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PRECISIONS = ("auto", "fp16", "bf16", "int8")
_LAYOUTS = ("bhsd", "bshd")
_ALIGNMENTS = ("top_left", "bottom_right")
_STAT_NAMES = ("blocks_allowed", "blocks_kept", "pv_units", "pv_skipped")


class _DefaultTopk(float):
    """topk's default (0.5), distinguishable from a topk the caller passed."""


_TOPK_DEFAULT = _DefaultTopk(0.5)

# Set by sparge.calibrate while it captures a model's attention calls: it gets
# attn's SDPA arguments and returns the dense output (None: run normally).
_observer = None


def _note_fallback(where: str, reason: str) -> None:
    # stacklevel 5: the warning names the caller of the caller of sparge's entry point, as it always has
    _fallback.note_fallback(where, reason, f"sparge: falling back to torch SDPA: {reason}", stacklevel=5)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------
def _check_tensor(t, name: str, ndim: int = 4) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not float16, bfloat16 or float32")
    if any(s == 0 for s in t.shape):
        raise ValueError(f"{name}: has a zero-size dimension, shape {tuple(t.shape)}")


def _check_qkv(q, k, v, layout: str, enable_gqa: bool):
    """Returns [B, H, L, D] views of q, k, v (no copies)."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout: expected one of {_LAYOUTS}, got {layout!r}")
    _check_tensor(q, "query")
    _check_tensor(k, "key")
    if v is not None:
        _check_tensor(v, "value")
    for t, name in ((k, "key"), (v, "value")):
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from query's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device} but query is on {q.device}")
    if layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.transpose(1, 2) if v is not None else None
    B, Hq, _, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"key: batch size {k.shape[0]} differs from query's {B}")
    if k.shape[3] != D:
        raise ValueError(f"key: head dim {k.shape[3]} differs from query's {D}")
    Hkv = k.shape[1]
    if v is not None:
        if v.shape[0] != B or v.shape[1] != Hkv or v.shape[2] != k.shape[2]:
            raise ValueError(f"value: shape {tuple(v.shape)} does not match key's {tuple(k.shape)} "
                             "in batch, heads and length")
    if Hq % Hkv != 0:
        raise ValueError(f"key: {Hq} query heads are not a multiple of {Hkv} key/value heads")
    if Hq != Hkv and not enable_gqa:
        raise ValueError(f"enable_gqa: query has {Hq} heads and key/value {Hkv}; pass enable_gqa=True for GQA/MQA")
    return q, k, v


def _check_number(x, name: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
                  allow_inf: bool = False) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(x).__name__}")
    x = float(x)
    if math.isnan(x) or (math.isinf(x) and not allow_inf):
        raise ValueError(f"{name}: {x} is not finite")
    if x < lo or x > hi or (lo_open and x == lo):
        lo_b = "(" if lo_open else "["
        raise ValueError(f"{name}: {x} is outside {lo_b}{lo}, {hi}]")


def _head_param(x: Hyper, name: str, H: int, device: torch.device, lo: float = -math.inf, hi: float = math.inf,
                lo_open: bool = False, allow_inf: bool = False) -> torch.Tensor:
    """A float or a per-head tensor as a float32 [H] tensor on device."""
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{name}: per-head tensor must be floating point, got {x.dtype}")
        if x.dim() > 1 or (x.dim() == 1 and x.shape[0] not in (1, H)):
            raise ValueError(f"{name}: per-head tensor must have shape [{H}] (one value per query head), "
                             f"got {tuple(x.shape)}")
        if x.device.type != "cpu" and x.device != device:
            raise ValueError(f"{name}: on {x.device} but query is on {device}")
        t = x.to(device=device, dtype=torch.float32).reshape(-1).expand(H)
        if x.device.type == "cpu" and not _compiling():  # checking device data would synchronize
            bad = torch.isnan(t) | (torch.isinf(t) & (not allow_inf)) | (t < lo) | (t > hi) | ((t == lo) & lo_open)
            if bool(bad.any()):
                raise ValueError(f"{name}: per-head values must lie in {'(' if lo_open else '['}{lo}, {hi}] "
                                 f"and be {'non-NaN' if allow_inf else 'finite'}, got {x.tolist()}")
        return t.contiguous()
    _check_number(x, name, lo, hi, lo_open, allow_inf)
    return _constant_vector(float(x), H, device)


_constants: Dict[Tuple[float, int, torch.device], torch.Tensor] = {}


def _constant_vector(x: float, H: int, device: torch.device) -> torch.Tensor:
    """A read-only float32 [H] tensor filled with x, cached per device so that a
    call makes no fill launches (not while compiling or capturing a graph,
    where a cached tensor could outlive its memory pool)."""
    if _compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.full((H,), x, dtype=torch.float32, device=device)
    key = (x, H, device)
    t = _constants.get(key)
    if t is None:
        if len(_constants) > 512:
            _constants.clear()
        t = _constants[key] = torch.full((H,), x, dtype=torch.float32, device=device)
    return t


def _check_precision(precision) -> None:
    if precision not in _PRECISIONS:
        raise ValueError(f"precision: expected one of {_PRECISIONS}, got {precision!r}")


def _check_flag(x, name: str) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name}: expected a bool, got {type(x).__name__}")
    return x


def _resolve_scale(scale, D: int) -> float:
    if scale is None:
        return D ** -0.5
    _check_number(scale, "scale")
    return float(scale)


def _causal_mode(is_causal: bool, causal_alignment: str) -> Optional[str]:
    _check_flag(is_causal, "is_causal")
    if causal_alignment not in _ALIGNMENTS:
        raise ValueError(f"causal_alignment: expected one of {_ALIGNMENTS}, got {causal_alignment!r}")
    return causal_alignment if is_causal else None


def _selection(topk, cdf_threshold):
    """(select_mode, value) from topk / cdf_threshold; exactly one is used."""
    topk_given = topk is not _TOPK_DEFAULT and topk is not None
    if cdf_threshold is not None:
        if topk_given:
            raise ValueError("topk: give either topk or cdf_threshold, not both")
        return _lib.SELECT_CDF, cdf_threshold
    if topk is None:
        raise ValueError("topk: one of topk and cdf_threshold is required")
    return _lib.SELECT_TOPK, (0.5 if topk is _TOPK_DEFAULT else topk)


def _key_padding(attn_mask, B: int, Hq: int, Lq: int, Lk: int) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    """(key padding [B, Lk] bool, None) when attn_mask is a key-padding mask,
    (None, reason) when it needs the SDPA fallback; raises for nonsense."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask: has {attn_mask.dim()} dimensions, at most 4 broadcast to [B, H, Lq, Lk]")
    full = (1,) * (4 - len(shape)) + shape
    for have, want, what in zip(full, (B, Hq, Lq, Lk), ("B", "H", "Lq", "Lk")):
        if have not in (1, want):
            raise ValueError(f"attn_mask: shape {shape} does not broadcast to [B, H, Lq, Lk] = "
                             f"[{B}, {Hq}, {Lq}, {Lk}] (dimension {what})")
    if attn_mask.dtype != torch.bool:
        return None, "a float attn_mask (only boolean key-padding masks run natively)"
    if full[1] != 1 or full[2] != 1:
        return None, "a boolean attn_mask that varies over heads or queries (only key padding runs natively)"
    return attn_mask.reshape(full[0], Lk).expand(B, Lk), None


def _decompose_bool_mask(mask: torch.Tensor, Lq: int, Lk: int):
    """(causal alignment or None, key padding [B, Lk]) when a boolean mask
    broadcastable to [B, 1, Lq, Lk] equals (causal pattern) AND (key padding),
    as padded batches of causal LMs build them; None for any other mask. Reads
    the mask's values (one host synchronization)."""
    if mask.dtype != torch.bool or mask.dim() > 4:
        return None
    full = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if full[1] != 1 or full[2] not in (1, Lq) or full[3] != Lk:
        return None
    m = mask.reshape(full[0], full[2], Lk)
    kp = m.any(dim=1)  # [B, Lk]: keys some query sees
    candidates = (None, "top_left", "bottom_right")
    hits = []
    for alignment in candidates:  # one at a time: at most two [B, Lq, Lk] temporaries alive
        want = kp[:, None, :]
        if alignment is not None:
            want = want & reference.visible_keys(Lq, Lk, alignment, mask.device)[None]
        hits.append((m == want).all())
    for alignment, hit in zip(candidates, torch.stack(hits).tolist()):  # one host synchronization
        if hit:
            return alignment, kp
    return None


def _check_key_padding_mask(key_padding_mask, B: int, Lk: int, device) -> Optional[torch.Tensor]:
    """A [B, Lk] bool view (True = attend) of a broadcastable key-padding mask."""
    if key_padding_mask is None:
        return None
    if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
        raise TypeError("key_padding_mask: expected a bool tensor [B, Lk]")
    if key_padding_mask.device != device:
        raise ValueError(f"key_padding_mask: on {key_padding_mask.device} but query is on {device}")
    try:
        return key_padding_mask.expand(B, Lk)
    except RuntimeError:
        raise ValueError(f"key_padding_mask: shape {tuple(key_padding_mask.shape)} does not broadcast to "
                         f"[B, Lk] = [{B}, {Lk}]") from None


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def block_shape(device: Union[str, torch.device], head_dim: int, precision: str = "auto",
                dtype: torch.dtype = torch.float16, head_dim_v: Optional[int] = None) -> Tuple[int, int]:
    """(BQ, BK) of the kernel sparge uses on ``device`` for this head dim."""
    device = torch.device(device)
    _check_precision(precision)
    bq, bk, _, _ = _lib.kernel_config(device, head_dim, head_dim if head_dim_v is None else head_dim_v, dtype,
                                      precision)
    return bq, bk


def _native_reason(device: torch.device, D: int, Dv: int, dtype, precision: str) -> Optional[str]:
    try:
        _lib.kernel_config(device, D, Dv, dtype, precision)
    except _lib.NotSupportedError as e:
        return str(e)
    return None


def predict(query, key, *, is_causal: bool = False, scale=None, enable_gqa: bool = False, topk=_TOPK_DEFAULT,
            cdf_threshold=None, sim_threshold: Hyper = -0.1, attention_sink: bool = False,
            causal_alignment: str = "top_left", layout: str = "bhsd", block_size: Optional[Tuple[int, int]] = None,
            precision: str = "auto") -> torch.Tensor:
    """Stage 1 alone: the block mask ``[B, Hq, nq, nk]`` (bool) that ``attn`` would use."""
    q, k, _ = _check_qkv(query, key, None, layout, enable_gqa)
    causal = _causal_mode(is_causal, causal_alignment)
    s = _resolve_scale(scale, q.shape[3])
    mode, sel = _selection(topk, cdf_threshold)
    _check_flag(attention_sink, "attention_sink")
    _check_precision(precision)
    Hq = q.shape[1]
    sel_t = _head_param(sel, "topk" if mode == _lib.SELECT_TOPK else "cdf_threshold", Hq, q.device, 0.0, 1.0,
                        lo_open=True)
    sim_t = _head_param(sim_threshold, "sim_threshold", Hq, q.device)
    bq, bk = _block_size(block_size, q, k, None, precision)
    return _predict_mask(q, k, sim_t, sel_t, s, causal, mode, attention_sink, bq, bk)


def _block_size(block_size, q, k, v, precision) -> Tuple[int, int]:
    if block_size is not None:
        if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block_size)):
            raise ValueError(f"block_size: expected (BQ, BK) positive ints, got {block_size!r}")
        return int(block_size[0]), int(block_size[1])
    Dv = v.shape[3] if v is not None else q.shape[3]
    try:
        bq, bk, _, _ = _lib.kernel_config(q.device, q.shape[3], Dv, q.dtype, precision)
    except _lib.NotSupportedError:
        # no kernel here: the reference uses the CPU backend's shape
        bq, bk, _, _ = _lib.kernel_config(torch.device("cpu"), q.shape[3], Dv, q.dtype, "auto")
    return bq, bk


def _predict_mask(q, k, sim_t, sel_t, scale, causal, mode, sink, bq, bk) -> torch.Tensor:
    reason = _lib.device_reason(q.device.type, q.device.index or 0) if q.device.type != "cpu" else None
    if reason is None:
        return _ops.run_predict(q, k, sim_t, sel_t, scale, _lib.CAUSAL_CODES[causal], mode, sink, bq, bk)
    _note_fallback("sparge.predict", f"prediction on {q.device.type} runs the torch reference ({reason})")
    topk = sel_t if mode == _lib.SELECT_TOPK else None
    cdf = sel_t if mode == _lib.SELECT_CDF else None
    return reference.predict(q, k, block_q=bq, block_k=bk, scale=scale, causal=causal, topk=topk,
                             cdf_threshold=cdf, sim_threshold=sim_t, attention_sink=sink)


def _stats_dict(stats: torch.Tensor) -> Dict[str, torch.Tensor]:
    d = {name: stats[..., i] for i, name in enumerate(_STAT_NAMES)}
    d["density"] = d["blocks_kept"].double() / d["blocks_allowed"].clamp(min=1).double()
    d["pv_skip_fraction"] = d["pv_skipped"].double() / d["pv_units"].clamp(min=1).double()
    return d


def _pack(out, lse, stats, return_lse: bool, return_stats: bool):
    if not return_lse and not return_stats:
        return out
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_stats:
        res += (_stats_dict(stats),)
    return res


def block_sparse_attn(query, key, value, block_mask, *, is_causal: bool = False, scale=None,
                      enable_gqa: bool = False, key_padding_mask: Optional[torch.Tensor] = None,
                      pv_threshold: Optional[Hyper] = None, causal_alignment: str = "top_left",
                      block_size: Optional[Tuple[int, int]] = None, precision: str = "auto",
                      layout: str = "bhsd", return_lse: bool = False, return_stats: bool = False):
    """The sparse kernel alone, over a caller-given block mask ``[B, Hq, nq, nk]``
    (bool, broadcastable) made for ``block_size`` (default: ``block_shape``).

    Returns ``out`` (and ``lse [B, Hq, Lq]``, ``stats`` dict when asked)."""
    q, k, v = _check_qkv(query, key, value, layout, enable_gqa)
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: last dimension must have stride 1 (got stride {t.stride(-1)}); "
                             "call .contiguous() first")
    causal = _causal_mode(is_causal, causal_alignment)
    s = _resolve_scale(scale, q.shape[3])
    _check_precision(precision)
    _check_flag(return_lse, "return_lse")
    _check_flag(return_stats, "return_stats")
    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    bq, bk = _block_size(block_size, q, k, v, precision)
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask: expected a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask: dtype {block_mask.dtype}, expected torch.bool")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask: on {block_mask.device} but query is on {q.device}")
    try:
        mask = block_mask.expand(B, Hq, nq, nk)
    except RuntimeError:
        raise ValueError(f"block_mask: shape {tuple(block_mask.shape)} does not broadcast to "
                         f"[B, Hq, nq, nk] = [{B}, {Hq}, {nq}, {nk}] for block size ({bq}, {bk})") from None
    kpad = _check_key_padding_mask(key_padding_mask, B, Lk, q.device)
    pv_t = None if pv_threshold is None else _head_param(pv_threshold, "pv_threshold", Hq, q.device, 0.0,
                                                         allow_inf=True)
    reason = _native_reason(q.device, D, Dv, q.dtype, precision)
    if reason is None:
        _, _, group, prec = _lib.kernel_config(q.device, D, Dv, q.dtype, precision)
        out, lse, stats = _ops.run_block_sparse_attn(q, k, v, mask, kpad, pv_t, s, _lib.CAUSAL_CODES[causal], prec, bq,
                                                 bk, min(group, bq), layout == "bshd", return_lse, return_stats)
        if layout == "bshd":
            out = out.transpose(1, 2)  # [B, Lq, Hq, Dv], contiguous
    else:
        _note_fallback("sparge.block_sparse_attn", f"block_sparse_attn runs the torch reference ({reason})")
        out, lse, stats = reference.block_sparse_attn(q, k, v, mask, block_q=bq, block_k=bk, scale=s,
                                                      causal=causal, key_padding_mask=kpad, pv_threshold=pv_t)
        out = out.to(q.dtype)
        if layout == "bshd":
            out = out.transpose(1, 2)
    return _pack(out, lse, stats, return_lse, return_stats)


def attn(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
         enable_gqa: bool = False, *, topk=_TOPK_DEFAULT, cdf_threshold=None, sim_threshold: Hyper = -0.1,
         pv_threshold: Optional[Hyper] = None, attention_sink: bool = False, precision: str = "auto",
         layout: str = "bhsd", config: Any = None, return_lse: bool = False, return_stats: bool = False,
         causal_alignment: str = "top_left", auto_dense: bool = True,
         key_padding_mask: Optional[torch.Tensor] = None):
    """Sparse drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Predicts which (BQ x BK) blocks of the attention map matter from pooled
    Q/K (keeping every non-self-similar block), then runs the fused sparse
    kernel over those blocks. ``topk=1.0`` with ``pv_threshold=None`` is dense
    attention. ``config`` (a ``sparge.LayerConfig``, a ``SpargeConfig`` with a
    single layer or only a default, or a dict with ``sim_threshold``,
    ``topk``/``cdf_threshold``, ``pv_threshold``) overrides those keywords.
    ``key_padding_mask`` (bool ``[B, Lk]``, True = attend) is a sparge
    extension that, unlike ``attn_mask``, combines with ``is_causal`` (padded
    causal batches). Returns ``out`` in the input layout and dtype, plus
    ``lse`` ``[B, Hq, Lq]``
    and a stats dict when asked. With ``auto_dense`` (default), a GPU call too
    small for sparsity to pay, or a top-k too high to beat torch's dense kernel,
    runs torch SDPA instead (exact; stats then report density 1).
    """
    if _observer is not None and not (return_lse or return_stats):
        out = _observer(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, layout,
                        causal_alignment, key_padding_mask)
        if out is not None:
            return out
    q, k, v = _check_qkv(query, key, value, layout, enable_gqa)
    if config is not None:
        over = _config.resolve(config, q.shape[1], q.device)
        sim_threshold = over.get("sim_threshold", sim_threshold)
        pv_threshold = over.get("pv_threshold", pv_threshold)
        if over.get("cdf_threshold") is not None:
            cdf_threshold, topk = over["cdf_threshold"], _TOPK_DEFAULT
        elif over.get("topk") is not None:
            topk, cdf_threshold = over["topk"], None
    causal = _causal_mode(is_causal, causal_alignment)
    B, Hq, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    s = _resolve_scale(scale, D)
    _check_number(dropout_p, "dropout_p", 0.0, 1.0)
    if dropout_p >= 1.0:
        raise ValueError(f"dropout_p: {dropout_p} must be < 1")
    mode, sel = _selection(topk, cdf_threshold)
    sel_t = _head_param(sel, "topk" if mode == _lib.SELECT_TOPK else "cdf_threshold", Hq, q.device, 0.0, 1.0,
                        lo_open=True)
    sim_t = _head_param(sim_threshold, "sim_threshold", Hq, q.device)
    pv_t = None if pv_threshold is None else _head_param(pv_threshold, "pv_threshold", Hq, q.device, 0.0,
                                                         allow_inf=True)
    _check_flag(attention_sink, "attention_sink")
    _check_flag(return_lse, "return_lse")
    _check_flag(return_stats, "return_stats")
    _check_flag(auto_dense, "auto_dense")
    _check_precision(precision)

    kpad, reason = None, None
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask: cannot be combined with is_causal=True (as in SDPA)")
        kpad, reason = _key_padding(attn_mask, B, Hq, Lq, Lk)
    if key_padding_mask is not None:
        if attn_mask is not None:
            raise ValueError("key_padding_mask: give either attn_mask or key_padding_mask, not both")
        kpad = _check_key_padding_mask(key_padding_mask, B, Lk, q.device)
    if reason is None and dropout_p > 0.0:
        reason = "dropout_p > 0 (sparge is an inference kernel)"
    if reason is None:
        reason = _native_reason(q.device, D, Dv, q.dtype, precision)
    if reason is not None:
        _note_fallback("sparge.attn", reason)
        return _sdpa_fallback(q, k, v, attn_mask, dropout_p, causal, s, layout, return_lse, return_stats, kpad)
    if auto_dense and not return_lse and _dense_pays(q, k, causal, mode, sel):
        # exact dense attention is faster here than prediction + sparse kernel
        return _sdpa_fallback(q, k, v, attn_mask, 0.0, causal, s, layout, False, return_stats, kpad)

    # copy only what the kernel cannot read in place (a non-unit last stride)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    bq, bk, group, prec = _lib.kernel_config(q.device, D, Dv, q.dtype, precision)
    mask = _predict_mask(q, k, sim_t, sel_t, s, causal, mode, attention_sink, bq, bk)
    out, lse, stats = _ops.run_block_sparse_attn(q, k, v, mask, kpad, pv_t, s, _lib.CAUSAL_CODES[causal], prec, bq, bk,
                                             group, layout == "bshd", return_lse, return_stats)
    if layout == "bshd":
        out = out.transpose(1, 2)  # [B, Lq, Hq, Dv], contiguous
    return _pack(out, lse, stats, return_lse, return_stats)


# On the GPU, sparsity pays only past a fixed cost (prediction, launches, Python)
# and under a density where the sparse kernel beats torch's best dense kernel.
# Measured on H100 (benchmarks/NOTES.md), top-k 0.25: at ~0.07 TFLOP (H=32,
# L=2048, D=128) sparse and cuDNN tie (0.111 vs 0.116 ms), at ~0.14 TFLOP
# (L=4096 causal) sparse wins (0.221 vs 0.275 ms); cuDNN's Hopper kernel is
# ~1.9x our sm80-style kernel, so top-k above ~0.45 loses there; on sm80/sm89
# our kernel matches FlashAttention-2.
_AUTO_DENSE_MIN_FLOP = 1e11
_AUTO_DENSE_TOPK = {9: 0.45}
_AUTO_DENSE_TOPK_DEFAULT = 0.9


def _dense_pays(q, k, causal, mode, sel) -> bool:
    if q.device.type != "cuda":
        return False
    B, Hq, Lq, D = q.shape
    flop = 4.0 * B * Hq * Lq * k.shape[2] * D / (2 if causal else 1)
    if flop < _AUTO_DENSE_MIN_FLOP:
        return True
    if mode != _lib.SELECT_TOPK or isinstance(sel, torch.Tensor):
        return False
    major = _lib.device_capability(q.device)[0]
    return float(sel) >= _AUTO_DENSE_TOPK.get(major, _AUTO_DENSE_TOPK_DEFAULT)


def _sdpa_fallback(q, k, v, attn_mask, dropout_p, causal, scale, layout, return_lse, return_stats,
                   key_padding=None):
    """Dense torch attention for inputs sparge does not run natively; q, k, v are
    [B, H, L, D] views, key_padding a [B, Lk] bool or None. LSE and stats,
    when asked, are computed densely too."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    Lq, Lk = q.shape[2], k.shape[2]
    mask, sdpa_causal = attn_mask, False
    if key_padding is not None:
        # [B, 1, Lq or 1, Lk]; rows that see no key give 0, as the kernel does
        mask = key_padding[:, None, None, :]
        if causal is not None:
            mask = mask & reference.visible_keys(Lq, Lk, causal, q.device)
    elif causal == "top_left" or (causal == "bottom_right" and Lq == Lk):
        sdpa_causal = True  # torch's own causal kernels, no mask tensor
        if return_lse:
            mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    elif causal is not None:
        mask = reference.visible_keys(Lq, Lk, causal, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if sdpa_causal else mask, dropout_p=dropout_p,
                                         is_causal=sdpa_causal, scale=scale)
    if key_padding is not None:
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # rows that see no key give 0, as the kernel does
    elif causal is not None and causal == "bottom_right" and Lq > Lk:
        out = out.masked_fill(~mask.any(-1)[:, None], 0.0)
    lse = stats = None
    if return_lse:
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
        lse = torch.logsumexp(s, dim=-1)
    if return_stats:
        B, Hq = q.shape[:2]
        # dense: every block counts as allowed and kept, nothing skipped
        stats = torch.tensor([1, 1, 0, 0], dtype=torch.int64, device=q.device).expand(B, Hq, 4)
    if layout == "bshd":
        out = out.transpose(1, 2)
    return _pack(out, lse, stats, return_lse, return_stats)
