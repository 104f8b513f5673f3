"""``sparge.patch_sdpa``: route ``torch.nn.functional.scaled_dot_product_attention``
to ``sparge.attn`` inside a scope.

    with sparge.patch_sdpa(topk=0.3):
        out = model(x)               # every SDPA call sparge supports runs sparse

    @sparge.patch_sdpa(cdf_threshold=0.9, pv_threshold=8.0)
    def generate(...): ...

Threads. The routing is per thread: only calls made by a thread that is
inside a ``patch_sdpa`` scope go to sparge; other threads keep torch's
behaviour. The module attribute ``torch.nn.functional.scaled_dot_product_attention``
is one global, so it is swapped for a router when the first scope of any thread
opens and put back when the last one closes (a lock-protected count). Between
those points, a thread without a scope that calls SDPA goes through the router
to the original function unchanged. Scopes nest (the innermost options win) and
are restored on exit even when the body raises.

Inputs of any rank >= 3, ``(N, ..., L, E)`` as SDPA takes them, are routed
(``sparge.attn`` flattens the leading dimensions by views). Calls the router
sends to the original function: tensors of rank < 3 or of different ranks,
other than float16/bfloat16/float32 on one CPU or CUDA device, masks other
than boolean key padding (broadcastable to ``[B, 1, 1, Lk]``, or
``(N, ..., 1, 1, Lk)`` for other ranks),
``dropout_p > 0``, inputs that need gradients (sparge is inference-only), and
anything SDPA itself would reject. Each reason is counted
(``sparge.fallback_counts()``, keys ``"patch_sdpa: <reason>"``) and warned
about once.

``sparge.calibrate`` opens its scopes through the same router (``enter``/``exit``
with a capturing context): the calls of the calibrating thread run torch's
SDPA and are calibrated on the way.

Code that bound the function before the scope opened
(``from torch.nn.functional import scaled_dot_product_attention``) keeps the
original; call sites that look it up through the module (``F.scaled_dot_product_attention``,
as torch, transformers and diffusers do) are routed.
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .._fallback import note_fallback
from ._common import CallContext, StatsRecorder, check_options, run_sdpa_like

__all__ = ["patch_sdpa", "original_sdpa", "is_patched"]

_lock = threading.Lock()
_count = 0
_original = None
_local = threading.local()
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def original_sdpa():
    """The SDPA function that the router replaced (torch's own when nothing is patched)."""
    fn = _original
    return fn if fn is not None else F.scaled_dot_product_attention


def is_patched() -> bool:
    """True while the router is installed (some thread is inside a scope)."""
    return F.scaled_dot_product_attention is _router


def _stack() -> list:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


def _acquire() -> None:
    global _count, _original
    with _lock:
        if _count == 0:
            current = F.scaled_dot_product_attention
            if current is not _router:
                _original = current
            F.scaled_dot_product_attention = _router
        _count += 1


def _release() -> None:
    global _count, _original
    with _lock:
        _count -= 1
        if _count > 0:
            return
        _count = 0
        if F.scaled_dot_product_attention is _router:
            F.scaled_dot_product_attention = _original
            _original = None
        else:
            # someone replaced the router after we installed it: keep theirs (the
            # router, if they call it, forwards to the original outside scopes)
            warnings.warn("sparge.patch_sdpa: torch.nn.functional.scaled_dot_product_attention was replaced "
                          "by other code while patched; leaving that replacement in place", RuntimeWarning,
                          stacklevel=3)


def hold() -> None:
    """Install the router until ``unhold()``, with no scope opened: for callers
    (the diffusers integration) that open scopes with ``push``/``pop`` inside
    code torch.compile traces, where taking the lock would break the graph."""
    _acquire()


def unhold() -> None:
    _release()


def push(ctx: CallContext) -> None:
    """Open a routing scope for this thread while the router is held (``pop(ctx)`` closes it)."""
    _stack().append(ctx)


def pop(ctx: CallContext) -> bool:
    """Close this thread's innermost scope of ``ctx``; False when it has none."""
    stack = _stack()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is ctx:
            del stack[i]
            return True
    return False


def enter(ctx: CallContext) -> None:
    """Open a routing scope for this thread (``exit(ctx)`` closes it)."""
    _acquire()
    push(ctx)


def exit(ctx: CallContext) -> None:  # noqa: A001 - pairs with enter
    if pop(ctx):  # else never entered on this thread: nothing to release
        _release()


def _unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, extra) -> Optional[str]:
    if extra:
        return f"arguments sparge does not know: {sorted(extra)}"
    ts = (query, key, value)
    if not all(type(t) is torch.Tensor or isinstance(t, torch.Tensor) for t in ts):
        return "non-tensor inputs"
    if any(t.is_nested for t in ts):
        return "nested tensors"
    rank = query.dim()
    if rank < 3 or key.dim() != rank or value.dim() != rank:
        return "inputs that are not (N, ..., L, E) of one rank >= 3"
    if any(t.dtype not in _DTYPES for t in ts) or len({t.dtype for t in ts}) > 1:
        return "dtypes other than one of float16, bfloat16, float32"
    dev = query.device
    if dev.type not in ("cpu", "cuda") or key.device != dev or value.device != dev:
        return f"tensors on {dev.type} (or on several devices)"
    if any(s == 0 for t in ts for s in t.shape):
        return "zero-size inputs"
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return "inputs that need gradients (sparge is inference-only)"
    if not isinstance(dropout_p, (int, float)) or dropout_p != 0.0:
        return "dropout_p > 0"
    lead = query.shape[:-3]  # batch dimensions (rank 3: N, with no head dimension)
    Hq, Hkv = (query.shape[-3], key.shape[-3]) if rank >= 4 else (1, 1)
    Lk = key.shape[-2]
    if Hq != Hkv and (not enable_gqa or Hq % Hkv != 0):
        return "mismatched head counts"
    if (key.shape[:-3] != lead or value.shape[:-1] != key.shape[:-1] or key.shape[-1] != query.shape[-1]
            or (rank == 3 and key.shape[0] != query.shape[0])):
        return "mismatched shapes"
    if attn_mask is not None:
        if is_causal:
            return "attn_mask together with is_causal"
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
            return "float attention masks"
        if attn_mask.dim() > rank or attn_mask.device != dev:
            return "attention masks of unusual rank or device"
        full = (1,) * (rank - attn_mask.dim()) + tuple(attn_mask.shape)
        batch = full[:-3] if rank >= 4 else full[:1]
        want = lead if rank >= 4 else query.shape[:1]
        heads_one = rank == 3 or full[-3] == 1
        if (not heads_one or full[-2] != 1 or full[-1] != Lk
                or any(b not in (1, w) for b, w in zip(batch, want))):
            return "boolean masks other than key padding"
    if not isinstance(is_causal, bool):
        return "a non-bool is_causal"
    return None


def _router(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
            **extra):
    stack = getattr(_local, "stack", None)
    orig = _original if _original is not None else torch._C._nn.scaled_dot_product_attention
    if not stack or getattr(_local, "busy", False):
        return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa, **extra)
    ctx = stack[-1]
    if ctx.capture is not None:
        # sparge.calibrate's scope: every call, supported or not, is seen and runs dense
        _local.busy = True  # calibration's own SDPA calls must reach the original
        try:
            return ctx.capture(orig, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra)
        finally:
            _local.busy = False
    reason = _unsupported(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, extra)
    if reason is not None:
        note_fallback(ctx.where, reason)
        return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa, **extra)
    _local.busy = True  # sparge's own fallbacks call SDPA: they must reach the original
    try:
        if attn_mask is not None and query.dim() == 4:
            attn_mask = attn_mask.reshape(attn_mask.shape[0] if attn_mask.dim() == 4 else 1, 1, 1, -1)
        # (other ranks: sparge.attn flattens the mask with the inputs' leading dimensions)
        return run_sdpa_like(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                             enable_gqa=enable_gqa, ctx=ctx)
    finally:
        _local.busy = False


class patch_sdpa(contextlib.ContextDecorator):
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to
    ``sparge.attn`` in this thread while the scope is open (context manager or
    decorator); restores the original on exit, even when the body raises.

    ``options`` are sparge.attn's keyword options (``topk``, ``cdf_threshold``,
    ``sim_threshold``, ``pv_threshold``, ``attention_sink``, ``precision``,
    ``auto_dense``); ``config`` a ``sparge.LayerConfig`` applied to every call.
    With ``record_stats=True``, ``.stats.summary()`` / ``.density()`` report the
    fraction of blocks computed.
    """

    def __init__(self, *, config=None, record_stats: bool = False, **options: Any):
        from ..config import LayerConfig

        if config is not None and not isinstance(config, LayerConfig):
            raise TypeError(f"config: patch_sdpa takes a sparge.LayerConfig (one config for every call), "
                            f"got {type(config).__name__}")
        if not isinstance(record_stats, bool):
            raise TypeError(f"record_stats: expected a bool, got {type(record_stats).__name__}")
        self.options = check_options(options, "patch_sdpa")
        self.stats = StatsRecorder() if record_stats else None
        self._ctx = CallContext("<sdpa>", config, self.options, stats=self.stats, where="patch_sdpa")

    def __enter__(self) -> "patch_sdpa":
        enter(self._ctx)
        return self

    def __exit__(self, *exc) -> bool:
        exit(self._ctx)
        return False

    def density(self) -> Optional[float]:
        """Fraction of attention blocks computed over the recorded calls (None without records)."""
        if self.stats is None:
            raise RuntimeError("density: create patch_sdpa(record_stats=True) to record it")
        s = self.stats.summary()
        return s["total"]["density"] if "total" in s else None
