"""torch.library custom ops over the C ABI, with fake (meta) implementations so
that ``torch.compile(fullgraph=True)`` traces them and CUDA graphs capture them.

The ops take ``[B, H, L, D]`` views (any strides, unit last stride) and copy
nothing, except on the GPU: fp32 inputs are cast to the kernels' 16-bit type
(``sparge.attn`` sends fp32 here only with ``precision="fp16"``/``"bf16"``,
``_args.compute_path``; by default fp32 runs torch SDPA in fp32), and rows the
kernels cannot load aligned are copied once (MISALIGNED retry).
``out_bshd`` chooses the memory layout of the attention output. Eager callers
use ``run_predict``/``run_block_sparse_attn``, which skip the dispatcher when
nothing traces.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _lib
from ._lib import _C


def _num_blocks(n, block: int):
    return (n + block - 1) // block


def _predict_impl(q: torch.Tensor, k: torch.Tensor, sim_threshold: torch.Tensor, select_param: torch.Tensor,
            scale: float, causal: int, select_mode: int, attention_sink: bool, block_q: int,
            block_k: int) -> torch.Tensor:
    B, Hq, Lq, _ = q.shape
    mask = torch.empty((B, Hq, _num_blocks(Lq, block_q), _num_blocks(k.shape[2], block_k)), dtype=torch.bool,
                       device=q.device)
    dq, dk = _lib.desc(q), _lib.desc(k)
    with _lib.device_guard(q.device):
        params = dict(scale=scale, causal=causal, select_mode=select_mode, attention_sink=int(attention_sink),
                      block_q=block_q, block_k=block_k)
        status, nbytes = _C.predict_workspace_size(dq, dk, **params)
        _lib.check(status, "sparge.predict")
        holder, address = _lib.workspace(nbytes, q.device)
        status = _C.predict(dq, dk, _lib.desc(sim_threshold), _lib.desc(select_param), **params,
                            out_mask=_lib.desc(mask), workspace=address, workspace_bytes=nbytes,
                            stream=_lib.stream_handle(q.device))
        del holder  # torch's caching allocator keeps it valid for the stream's pending work
    _lib.check(status, "sparge.predict")
    return mask


predict = torch.library.custom_op("sparge::predict", mutates_args=())(_predict_impl)


@predict.register_fake
def _predict_fake(q, k, sim_threshold, select_param, scale, causal, select_mode, attention_sink, block_q, block_k):
    B, Hq, Lq, _ = q.shape
    return q.new_empty((B, Hq, _num_blocks(Lq, block_q), _num_blocks(k.shape[2], block_k)), dtype=torch.bool)


def _attn_outputs(q, v, out_bshd: bool, return_lse: bool, return_stats: bool):
    B, Hq, Lq, _ = q.shape
    Dv = v.shape[3]
    if out_bshd:
        out = q.new_empty((B, Lq, Hq, Dv)).transpose(1, 2)
    else:
        out = q.new_empty((B, Hq, Lq, Dv))
    lse = q.new_empty((B, Hq, Lq) if return_lse else (0,), dtype=torch.float32)
    stats = q.new_empty((B, Hq, _C.NUM_STATS) if return_stats else (0,), dtype=torch.int64)
    return out, lse, stats


def _attn_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                      key_padding: Optional[torch.Tensor], pv_threshold: Optional[torch.Tensor], scale: float,
                      causal: int, precision: int, block_q: int, block_k: int, pv_group: int, out_bshd: bool,
                      return_lse: bool, return_stats: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, lse, stats = _attn_outputs(q, v, out_bshd, return_lse, return_stats)
    if q.device.type == "cuda" and q.dtype == torch.float32:
        # the GPU kernels compute in 16 bits: cast in, run, cast the result back (the
        # caller opted in with precision="fp16"/"bf16"; sparge.attn runs fp32 SDPA otherwise)
        compute = torch.float16 if precision == _lib.PRECISION_CODES["fp16"] else torch.bfloat16
        q, k, v = (t.to(compute) for t in (q, k, v))
        out16 = torch.empty_like(out, dtype=compute)
        _run_attn(q, k, v, block_mask, key_padding, pv_threshold, scale, causal, precision, block_q, block_k,
                  pv_group, out16, lse if return_lse else None, stats if return_stats else None)
        out.copy_(out16)
    else:
        _run_attn(q, k, v, block_mask, key_padding, pv_threshold, scale, causal, precision, block_q, block_k,
                  pv_group, out, lse if return_lse else None, stats if return_stats else None)
    # A custom op's outputs must be fresh tensors: out is a view only of its own storage.
    return out, lse, stats


def _run_attn(q, k, v, block_mask, key_padding, pv_threshold, scale, causal, precision, block_q, block_k, pv_group,
              out, lse, stats) -> None:
    def call(q, k, v):
        dq, dk, dv = _lib.desc(q), _lib.desc(k), _lib.desc(v)
        params = dict(scale=scale, causal=causal, precision=precision, block_q=block_q, block_k=block_k,
                      pv_group=pv_group)
        status, nbytes = _C.attn_workspace_size(dq, dk, dv, **params)
        _lib.check(status, "sparge.block_sparse_attn")
        holder, address = _lib.workspace(nbytes, q.device)
        status = _C.block_sparse_attn(dq, dk, dv, _lib.desc(block_mask), key_padding=_lib.desc(key_padding),
                                      pv_threshold=_lib.desc(pv_threshold), **params, out=_lib.desc(out),
                                      out_lse=_lib.desc(lse), out_stats=_lib.desc(stats), workspace=address,
                                      workspace_bytes=nbytes, stream=_lib.stream_handle(q.device))
        del holder  # torch's caching allocator keeps it valid for the stream's pending work
        return status

    with _lib.device_guard(q.device):
        status = call(q, k, v)
        if status == _lib.MISALIGNED:  # the kernel's 16-byte loads need aligned rows: copy once
            status = call(q.contiguous(), k.contiguous(), v.contiguous())
    _lib.check(status, "sparge.block_sparse_attn")


block_sparse_attn = torch.library.custom_op("sparge::block_sparse_attn", mutates_args=())(_attn_impl)


@block_sparse_attn.register_fake
def _block_sparse_attn_fake(q, k, v, block_mask, key_padding, pv_threshold, scale, causal, precision, block_q,
                            block_k, pv_group, out_bshd, return_lse, return_stats):
    return _attn_outputs(q, v, out_bshd, return_lse, return_stats)


def _direct(*tensors) -> bool:
    """True when an eager call may skip the dispatcher and run the op's body
    directly (~35 us saved per op): plain tensors without grad, no compile,
    no tracing or other dispatch mode active. Anything else goes through the
    registered op, so compile, export and fake tensors see it."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or (type(t) is torch.Tensor and not t.requires_grad) for t in tensors)


def run_predict(q, k, sim_threshold, select_param, **params) -> torch.Tensor:
    """``predict`` with the tensors positional and the rest by keyword (``scale``, ``causal``, ...)."""
    fn = _predict_impl if _direct(q, k, sim_threshold, select_param) else predict
    return fn(q, k, sim_threshold, select_param, **params)


def run_block_sparse_attn(q, k, v, block_mask, key_padding, pv_threshold, **params):
    """``block_sparse_attn`` with the tensors positional and the rest by keyword (``scale``, ``causal``, ...)."""
    fn = _attn_impl if _direct(q, k, v, block_mask, key_padding, pv_threshold) else block_sparse_attn
    return fn(q, k, v, block_mask, key_padding, pv_threshold, **params)
