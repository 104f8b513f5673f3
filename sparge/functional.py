"""The SDPA-compatible API: ``attn``, ``predict``, ``block_sparse_attn`` and
the policy that picks the sparse kernel, torch SDPA or a fallback for a call
(arguments resolved by ``_args.resolve_call``, fallbacks counted by ``_fallback``).

``attn`` keeps the parameter names and order of
``torch.nn.functional.scaled_dot_product_attention``; sparge's own options are
keyword-only. Bad input raises ValueError/TypeError naming the argument; valid
input that sparge cannot run natively goes to torch SDPA with a once-per-reason
warning and a counter (``fallback_counts()``).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch

from . import _args, _fallback, _lib, _ops, reference
from ._args import TOPK_DEFAULT as _TOPK_DEFAULT
from ._args import Hyper
from ._fallback import fallback_counts, reset_fallback_counts

__all__ = ["attn", "predict", "block_sparse_attn", "block_shape", "fallback_counts", "reset_fallback_counts"]

# Set by sparge.calibrate while it captures a model's attention calls: it gets
# attn's SDPA arguments and returns the dense output (None: run normally).
_observer = None


def _note_fallback(where: str, reason: str) -> None:
    # stacklevel 5: the warning names the caller of the caller of sparge's entry point, as it always has
    _fallback.note_fallback(where, reason, f"sparge: falling back to torch SDPA: {reason}", stacklevel=5)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def block_shape(device: Union[str, torch.device], head_dim: int, precision: str = "auto",
                dtype: torch.dtype = torch.float16, head_dim_v: Optional[int] = None) -> Tuple[int, int]:
    """(BQ, BK) of the kernel sparge uses on ``device`` for this head dim."""
    device = torch.device(device)
    _args.check_precision(precision)
    _args.check_dim(head_dim, "head_dim")
    if head_dim_v is not None:
        _args.check_dim(head_dim_v, "head_dim_v")
    bq, bk, _, _ = _lib.kernel_config(device, head_dim, head_dim if head_dim_v is None else head_dim_v, dtype,
                                      precision)
    return bq, bk


def predict(query, key, *, is_causal: bool = False, scale=None, enable_gqa: bool = False, topk=_TOPK_DEFAULT,
            cdf_threshold=None, sim_threshold: Hyper = -0.1, attention_sink: bool = False,
            causal_alignment: str = "top_left", layout: str = "bhsd", block_size: Optional[Tuple[int, int]] = None,
            precision: str = "auto") -> torch.Tensor:
    """Stage 1 alone: the block mask ``[B, Hq, nq, nk]`` (bool) that ``attn``
    would use (``(N, ..., nq, nk)`` for inputs of another rank)."""
    call = _args.resolve_call(query, key, _args.ABSENT, layout=layout, enable_gqa=enable_gqa, is_causal=is_causal,
                              causal_alignment=causal_alignment, scale=scale, precision=precision, topk=topk,
                              cdf_threshold=cdf_threshold, sim_threshold=sim_threshold)
    _args.check_flag(attention_sink, "attention_sink")
    bq, bk = call.block_shape(block_size)
    # copy only what the kernel cannot read in place (a non-unit last stride), as attn does
    call.q, call.k = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k))
    return call.unflatten(_predict_mask(call, attention_sink, bq, bk), 2)


def _predict_mask(call: _args.Call, sink: bool, bq: int, bk: int) -> torch.Tensor:
    q, k = call.q, call.k
    reason = _lib.device_reason(q.device.type, q.device.index or 0) if q.device.type != "cpu" else None
    if reason is None:
        return _ops.run_predict(q, k, call.sim_threshold, call.select_param, scale=call.scale,
                                causal=call.causal_code, select_mode=call.select_mode, attention_sink=sink,
                                block_q=bq, block_k=bk)
    _note_fallback("sparge.predict", f"prediction on {q.device.type} runs the torch reference ({reason})")
    topk = call.select_param if call.select_mode == _lib.SELECT_TOPK else None
    cdf = call.select_param if call.select_mode == _lib.SELECT_CDF else None
    return reference.predict(q, k, block_q=bq, block_k=bk, scale=call.scale, causal=call.causal, topk=topk,
                             cdf_threshold=cdf, sim_threshold=call.sim_threshold, attention_sink=sink)


def block_sparse_attn(query, key, value, block_mask, *, is_causal: bool = False, scale=None,
                      enable_gqa: bool = False, key_padding_mask: Optional[torch.Tensor] = None,
                      pv_threshold: Optional[Hyper] = None, causal_alignment: str = "top_left",
                      block_size: Optional[Tuple[int, int]] = None, precision: str = "auto",
                      layout: str = "bhsd", return_lse: bool = False, return_stats: bool = False):
    """The sparse kernel alone, over a caller-given block mask ``[B, Hq, nq, nk]``
    (bool, broadcastable) made for ``block_size`` (default: ``block_shape``).

    Returns ``out`` (and ``lse [B, Hq, Lq]``, ``stats`` dict when asked)."""
    call = _args.resolve_call(query, key, value, layout=layout, enable_gqa=enable_gqa, is_causal=is_causal,
                              causal_alignment=causal_alignment, scale=scale, precision=precision,
                              key_padding_mask=key_padding_mask, pv_threshold=pv_threshold, return_lse=return_lse,
                              return_stats=return_stats)
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: last dimension must have stride 1 (got stride {t.stride(-1)}); "
                             "call .contiguous() first")
    q, k, v = call.q, call.k, call.v
    B, Hq, Lq, Lk = call.B, call.Hq, call.Lq, call.Lk
    bq, bk = call.block_shape(block_size)
    nq, nk = -(-Lq // bq), -(-Lk // bk)
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask: expected a torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask: dtype {block_mask.dtype}, expected torch.bool")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask: on {block_mask.device} but query is on {q.device}")
    if call.lead is not None:  # broadcastable to (N, ..., nq, nk) like the query
        block_mask = _args.flatten_mask(block_mask, call.lead, "block_mask")
    try:
        mask = block_mask.expand(B, Hq, nq, nk)
    except RuntimeError:
        raise ValueError(f"block_mask: shape {tuple(block_mask.shape)} does not broadcast to "
                         f"[B, Hq, nq, nk] = [{B}, {Hq}, {nq}, {nk}] for block size ({bq}, {bk})") from None
    reason = call.native_reason() or call.precision_reason()
    if reason is None:
        _, _, group, prec = call.kernel()
        out, lse, stats = _ops.run_block_sparse_attn(q, k, v, mask, call.key_padding, call.pv_threshold,
                                                     scale=call.scale, causal=call.causal_code, precision=prec,
                                                     block_q=bq, block_k=bk, pv_group=min(group, bq),
                                                     out_bshd=layout == "bshd", return_lse=return_lse,
                                                     return_stats=return_stats)
    else:
        _note_fallback("sparge.block_sparse_attn", f"block_sparse_attn runs the torch reference ({reason})")
        out, lse, stats = reference.block_sparse_attn(q, k, v, mask, block_q=bq, block_k=bk, scale=call.scale,
                                                      causal=call.causal, key_padding_mask=call.key_padding,
                                                      pv_threshold=call.pv_threshold)
        out = out.to(q.dtype)
    return call.finish(out, lse, stats)


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

    Inputs are SDPA's ``(N, ..., L, E)`` of any rank >= 3 (rank 3: one head;
    leading dimensions flatten into the batch by views); ``layout="bshd"``
    takes 4-D ``[B, L, H, D]``. Precision: float32 inputs get float32
    accuracy by default; the CPU computes them in float32, and on CUDA (whose
    kernels have 16-bit operands) they run torch SDPA in float32, warned once
    and counted. ``precision="bf16"``/``"fp16"`` opts into the sparse kernel in
    16 bits for float32 inputs there.
    """
    if _observer is not None and not (return_lse or return_stats):
        out = _observer(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, layout,
                        causal_alignment, key_padding_mask)
        if out is not None:
            return out
    call = _args.resolve_call(query, key, value, layout=layout, enable_gqa=enable_gqa, is_causal=is_causal,
                              causal_alignment=causal_alignment, scale=scale, precision=precision,
                              dropout_p=dropout_p, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              config=config, topk=topk, cdf_threshold=cdf_threshold, sim_threshold=sim_threshold,
                              pv_threshold=pv_threshold, return_lse=return_lse, return_stats=return_stats)
    _args.check_flag(attention_sink, "attention_sink")
    _args.check_flag(auto_dense, "auto_dense")

    reason = call.mask.reason
    if reason is None and dropout_p > 0.0:
        reason = "dropout_p > 0 (sparge is an inference kernel)"
    if reason is None:
        reason = call.native_reason()
    if reason is None:
        reason = call.precision_reason()  # float32 on CUDA without an opt-in to 16 bits
    if reason is not None:
        _note_fallback("sparge.attn", reason)
        return call.finish(*_fallback.sdpa(call, call.attn_mask, dropout_p))
    if auto_dense and not return_lse and _dense_pays(call.q, call.k, call.causal, call.select_mode, call.selection):
        # exact dense attention is faster here than prediction + sparse kernel
        return call.finish(*_fallback.sdpa(call, call.attn_mask))

    # copy only what the kernel cannot read in place (a non-unit last stride)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (call.q, call.k, call.v))
    call.q, call.k, call.v = q, k, v
    bq, bk, group, prec = call.kernel()
    mask = _predict_mask(call, attention_sink, bq, bk)
    out, lse, stats = _ops.run_block_sparse_attn(q, k, v, mask, call.key_padding, call.pv_threshold,
                                                 scale=call.scale, causal=call.causal_code, precision=prec,
                                                 block_q=bq, block_k=bk, pv_group=group, out_bshd=layout == "bshd",
                                                 return_lse=return_lse, return_stats=return_stats)
    return call.finish(out, lse, stats)


# On the GPU, sparsity pays only past a fixed cost (prediction, launches, Python)
# and under a density where the sparse kernel beats torch's best dense kernel.
# Measured on H100 (benchmarks/NOTES.md), top-k 0.25: at ~0.07 TFLOP (H=32,
# L=2048, D=128) sparse and cuDNN tie (0.111 vs 0.116 ms), at ~0.14 TFLOP
# (L=4096 causal) sparse wins (0.221 vs 0.275 ms). The top-k above which dense
# wins depends on the kernel the registry runs, which block_shape's pv_group
# tells apart: on sm90 the wgmma kernel (pv_group 64, D 64/128) runs dense at
# 0.90x (D=128) / 0.73x (D=64) of cuDNN and scales linearly with density
# (H200, benchmarks/NOTES.md "Hopper kernel"), so sparse wins up to top-k ~0.85
# / ~0.65; the sm80-style kernel there (other head dims) is ~1.9x slower than
# cuDNN, so top-k above ~0.45 loses; on sm80/sm89 it matches FlashAttention-2.
_AUTO_DENSE_MIN_FLOP = 1e11
_AUTO_DENSE_TOPK = {9: 0.45}
_AUTO_DENSE_TOPK_SM90_WGMMA = {64: 0.65, 128: 0.85}
_AUTO_DENSE_TOPK_DEFAULT = 0.9
_SM90_WGMMA_PV_GROUP = 64


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
    limit = _AUTO_DENSE_TOPK.get(major, _AUTO_DENSE_TOPK_DEFAULT)
    if major == 9 and D in _AUTO_DENSE_TOPK_SM90_WGMMA:
        try:
            group = _lib.kernel_config(q.device, D, D, q.dtype, "auto")[2]
        except (_lib.NotSupportedError, ValueError):
            group = 0
        if group == _SM90_WGMMA_PV_GROUP:
            limit = _AUTO_DENSE_TOPK_SM90_WGMMA[D]
    return float(sel) >= limit

