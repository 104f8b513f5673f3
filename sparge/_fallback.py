"""Fallbacks: one counter of the calls sparge handed to a dense
implementation, keyed ``"<where>: <reason>"`` (``sparge.attn``,
``sparge.predict``, ``sparge.block_sparse_attn``, ``patch_sdpa``,
``transformers attention``, ``diffusers attention``), a warning the first time
each key is seen, and the dense torch attention ``sparge.attn`` falls back to.

``sparge.fallback_counts()`` and ``sparge.integrations.fallback_counts()``
are this module's ``fallback_counts``.

Counting and warning happen in eager code only: while ``torch.compile``
traces (``torch.compiler.is_compiling()``), ``note_fallback`` does nothing, so
a fallback inside ``torch.compile(fullgraph=True)`` traces with no lock, no
warning and no Python side effect in the graph (a lock is an "Unsupported
context manager" for Dynamo). Compiled fallbacks are therefore not counted.
"""
from __future__ import annotations

import threading
import warnings
from collections import Counter
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from . import _args, reference
from ._args import Call

__all__ = ["fallback_counts", "reset_fallback_counts", "note_fallback", "sdpa"]

_counts: Counter = Counter()
_lock = threading.Lock()


def fallback_counts() -> Dict[str, int]:
    """How often each fallback was taken since import (or the last reset), by
    ``"<where>: <reason>"``: sparge's own entry points and the integrations."""
    with _lock:
        return dict(_counts)


def reset_fallback_counts() -> None:
    """Forget the counts; the next fallback of each kind warns again."""
    with _lock:
        _counts.clear()


def note_fallback(where: str, reason: str, message: Optional[str] = None, stacklevel: int = 3) -> None:
    """Count a fallback and warn the first time its key is seen. ``message``
    defaults to the integrations' wording; ``stacklevel`` counts from the
    caller of this function, as ``warnings.warn`` does. A no-op while
    torch.compile traces (see the module docstring)."""
    if torch.compiler.is_compiling():
        return
    key = f"{where}: {reason}"
    with _lock:
        first = key not in _counts
        _counts[key] += 1
    if first:
        if message is None:
            message = f"sparge: {where} falls back to the dense implementation: {reason}"
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def sdpa(call: Call, attn_mask=None, dropout_p: float = 0.0):
    """Dense torch attention for a call sparge does not run natively (or runs
    densely by policy), with the call's causal alignment and key padding:
    (out [B, Hq, Lq, Dv], lse, stats); LSE and stats, when the call asks for
    them, are computed densely too (``call.finish`` makes the caller's result)."""
    q, k, v = call.q, call.k, call.v
    if attn_mask is not None and call.lead is not None and attn_mask is not call.attn_mask:
        attn_mask = _args.flatten_mask(attn_mask, call.lead, "attn_mask")  # a mask over (N, ..., Lq, Lk)
    causal, scale, key_padding = call.causal, call.scale, call.key_padding
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
        if call.return_lse:
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
    if call.return_lse:
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
        lse = torch.logsumexp(s, dim=-1)
    if call.return_stats:
        B, Hq = q.shape[:2]
        # dense: every block counts as allowed and kept, nothing skipped
        stats = torch.tensor([1, 1, 0, 0], dtype=torch.int64, device=q.device).expand(B, Hq, 4)
    return out, lse, stats
