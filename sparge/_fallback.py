"""Fallbacks: one counter of the calls sparge handed to a dense
implementation, keyed ``"<where>: <reason>"`` (``sparge.attn``,
``sparge.predict``, ``sparge.block_sparse_attn``, ``patch_sdpa``,
``transformers attention``, ``diffusers attention``), a warning the first time
each key is seen.

``sparge.fallback_counts()`` and ``sparge.integrations.fallback_counts()``
are this module's ``fallback_counts``.
"""
from __future__ import annotations

import threading
import warnings
from collections import Counter
from typing import Dict, Optional

__all__ = ["fallback_counts", "reset_fallback_counts", "note_fallback"]

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
    caller of this function, as ``warnings.warn`` does."""
    key = f"{where}: {reason}"
    with _lock:
        first = key not in _counts
        _counts[key] += 1
    if first:
        if message is None:
            message = f"sparge: {where} falls back to the dense implementation: {reason}"
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
