"""What the integrations share: option checks, the per-call context (module
path, layer config, Hilbert grid, stats), the sparse call with causal + key
padding, density bookkeeping and once-per-message warnings. Fallbacks are
counted by ``sparge._fallback.note_fallback`` (one counter for sparge and the
integrations, ``sparge.fallback_counts()``).

Nothing here imports transformers or diffusers.
"""
from __future__ import annotations

import math
import threading
import warnings
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

# module level, not inside the functions torch.compile traces (torch 2.11
# breaks the graph on imports there)
from .. import functional, hilbert

# Keyword options of sparge.attn an integration may set for every call it routes.
ATTN_OPTIONS = ("topk", "cdf_threshold", "sim_threshold", "pv_threshold", "attention_sink", "precision",
                "auto_dense")
_SELECTION = ("topk", "cdf_threshold")

_notes: set = set()
_notes_lock = threading.Lock()


def note_once(where: str, message: str) -> None:
    """Warn once per message (things that are not a dense fallback); a no-op
    while torch.compile traces (no lock in traced code)."""
    if torch.compiler.is_compiling():
        return
    key = f"{where}: {message}"
    with _notes_lock:
        first = key not in _notes
        _notes.add(key)
    if first:
        warnings.warn(f"sparge: {where}: {message}", RuntimeWarning, stacklevel=3)


def check_options(options: Mapping[str, Any], where: str = "attn_options") -> Dict[str, Any]:
    """The sparge.attn keyword options an integration accepts; TypeError names an unknown one."""
    unknown = sorted(set(options) - set(ATTN_OPTIONS))
    if unknown:
        raise TypeError(f"{where}: unknown option(s) {unknown}; allowed: {', '.join(ATTN_OPTIONS)}")
    if all(options.get(name) is not None for name in _SELECTION):
        raise ValueError(f"{where}: give either topk or cdf_threshold, not both")
    return {k: v for k, v in options.items() if v is not None or k == "pv_threshold"}


def check_config(config, where: str = "config"):
    from ..config import LayerConfig, SpargeConfig

    if config is None or isinstance(config, (SpargeConfig, LayerConfig)):
        return config
    raise TypeError(f"{where}: expected a sparge.SpargeConfig, a sparge.LayerConfig or None, "
                    f"got {type(config).__name__}")


def layer_config(config, path: str):
    """The LayerConfig for ``path``: a SpargeConfig's entry (or default), a LayerConfig as is."""
    from ..config import SpargeConfig

    if isinstance(config, SpargeConfig):
        return config.layer(path)
    return config


def check_grid(grid, where: str = "hilbert_grid") -> Optional[Tuple[int, ...]]:
    if grid is None:
        return None
    if (not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3)
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"{where}: expected (H, W) or (T, H, W) positive ints in tokens, got {grid!r}")
    return tuple(int(g) for g in grid)


# --------------------------------------------------------------------------
# Density bookkeeping
# --------------------------------------------------------------------------
class StatsRecorder:
    """Blocks kept / allowed per module path, summed on the device (no host
    sync until read)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sums: Dict[str, List[torch.Tensor]] = {}
        self._calls: Counter = Counter()

    def add(self, path: str, stats: Mapping[str, torch.Tensor]) -> None:
        kept = stats["blocks_kept"].sum()
        allowed = stats["blocks_allowed"].sum()
        skipped = stats["pv_skipped"].sum()
        units = stats["pv_units"].sum()
        with self._lock:
            cur = self._sums.get(path)
            if cur is None or cur[0].device != kept.device:
                self._sums[path] = [kept, allowed, skipped, units]
            else:
                self._sums[path] = [cur[0] + kept, cur[1] + allowed, cur[2] + skipped, cur[3] + units]
            self._calls[path] += 1

    def reset(self) -> None:
        with self._lock:
            self._sums.clear()
            self._calls.clear()

    def summary(self) -> Dict[str, Dict[str, float]]:
        """{path: {"density", "pv_skip_fraction", "calls"}} plus "total" over all paths."""
        with self._lock:
            sums = {p: [int(t.item()) for t in v] for p, v in self._sums.items()}
            calls = dict(self._calls)
        out: Dict[str, Dict[str, float]] = {}
        tot = [0, 0, 0, 0]
        for path, (kept, allowed, skipped, units) in sums.items():
            out[path] = {"density": kept / max(allowed, 1), "pv_skip_fraction": skipped / max(units, 1),
                         "calls": calls[path]}
            tot = [a + b for a, b in zip(tot, (kept, allowed, skipped, units))]
        if sums:
            out["total"] = {"density": tot[0] / max(tot[1], 1), "pv_skip_fraction": tot[2] / max(tot[3], 1),
                            "calls": sum(calls.values())}
        return out


# --------------------------------------------------------------------------
# The per-call context
# --------------------------------------------------------------------------
class CallContext:
    """What a routed attention call needs to know about its caller."""

    __slots__ = ("path", "config", "options", "grid", "text_first", "stats", "where", "capture")

    def __init__(self, path: Optional[str] = None, config=None, options: Optional[Dict[str, Any]] = None,
                 grid: Optional[Tuple[int, ...]] = None, text_first: Optional[bool] = None,
                 stats: Optional[StatsRecorder] = None, where: str = "sparge", capture=None):
        self.path = path
        self.config = config          # a LayerConfig (already looked up) or None
        self.options = options or {}
        self.grid = grid
        self.text_first = text_first
        self.stats = stats
        self.where = where
        # sparge.calibrate: capture(original_sdpa, query, key, value, attn_mask, dropout_p, is_causal, scale,
        # enable_gqa, extra) runs every SDPA call of the scope instead of routing it to sparge
        self.capture = capture


_local = threading.local()


def context_stack() -> list:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


def current_context() -> Optional[CallContext]:
    s = getattr(_local, "stack", None)
    return s[-1] if s else None


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------
# Running attention
# --------------------------------------------------------------------------
def _visual_offset(L: int, n: int, text_first: Optional[bool]) -> Optional[int]:
    """Where the n visual tokens start in a sequence of L tokens, None when unknown."""
    if L == n:
        return 0
    if L < n or text_first is None:
        return None
    return L - n if text_first else 0


def run_sdpa_like(q, k, v, *, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
                  enable_gqa: bool = False, layout: str = "bhsd", causal_alignment: str = "top_left",
                  key_padding_mask: Optional[torch.Tensor] = None, ctx: Optional[CallContext] = None):
    """sparge.attn with the context's options and layer config, Hilbert
    reordering of the visual tokens when the context has a grid, and density
    recorded when it has a recorder."""
    ctx = ctx or CallContext()
    seq = 2 if layout == "bhsd" else 1
    qo = ko = None
    if ctx.grid is not None and attn_mask is None and key_padding_mask is None and not is_causal and q.dim() == 4:
        n = math.prod(ctx.grid)
        qo = _visual_offset(q.shape[seq], n, ctx.text_first)
        ko = _visual_offset(k.shape[seq], n, ctx.text_first)
        if qo is None and ko is None:
            note_once(ctx.where, f"no Hilbert reordering for a call of {q.shape[seq]} tokens and a grid of {n} "
                                 "tokens (pass text_first= to say where the text tokens are)")
        if qo is not None:
            q = hilbert.reorder(q, ctx.grid, offset=qo, layout=layout)
        if ko is not None:  # keys and values together: attention does not depend on key order
            k = hilbert.reorder(k, ctx.grid, offset=ko, layout=layout)
            v = hilbert.reorder(v, ctx.grid, offset=ko, layout=layout)
    want_stats = ctx.stats is not None
    res = functional.attn(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, layout=layout,
                          config=ctx.config, return_stats=want_stats, causal_alignment=causal_alignment,
                          key_padding_mask=key_padding_mask, **ctx.options)
    out = res
    if want_stats:
        out, st = res
        ctx.stats.add(ctx.path or "<unnamed>", st)
    if qo is not None:
        out = hilbert.restore(out, ctx.grid, offset=qo, layout=layout)
    return out


def attention(q, k, v, *, causal: Optional[str], key_padding: Optional[torch.Tensor], scale=None,
              ctx: Optional[CallContext] = None):
    """[B, H, L, D] attention with an optional causal alignment and key padding
    ([B, Lk] bool, True = attend): one sparge.attn call, which takes both."""
    return run_sdpa_like(q, k, v, is_causal=causal is not None, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                         causal_alignment=causal or "top_left", key_padding_mask=key_padding, ctx=ctx)


def find_modules(model: torch.nn.Module, types: Sequence[type]) -> List[Tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, tuple(types))]
