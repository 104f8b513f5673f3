"""HuggingFace transformers: ``attn_implementation="sparge"``.

    from sparge.integrations import transformers as sparge_tf
    sparge_tf.register(topk=0.5)                      # once, before loading
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sparge")
    # or, on a loaded model, with per-layer hyperparameters:
    sparge_tf.apply(model, config=sparge.SpargeConfig.load("model.sparge.json"))
    sparge_tf.remove(model)                           # back to the previous implementation

``register`` adds an attention function ``"sparge"`` to
``transformers.AttentionInterface`` and a mask function of the same name to
``AttentionMaskInterface``. The mask function is transformers' ``sdpa_mask``
(so every model gets the boolean ``(B, 1, Q, KV)`` mask, or ``None`` where
SDPA's ``is_causal`` suffices) plus a note on the returned tensor of how it was
built (causal or bidirectional pattern, query/key offsets, the 2-D padding
mask). Without a registered mask function transformers passes
``attention_mask=None`` and causal LMs would attend bidirectionally.

The attention function receives ``(module, query, key, value, attention_mask,
scaling=, dropout=, is_causal=?, **kwargs)`` with q/k/v ``[B, H, S, D]`` and K/V
on the KV heads (GQA is not expanded), and returns ``([B, S, H, D], None)``. A
mask built as causal-or-full AND key padding runs natively in sparge
(``is_causal`` top-left, or bottom-right for KV-cache decode / chunked prefill,
plus ``[B, Lk]`` key padding) with no host synchronization. A mask that carries
no note (a custom 4-D mask, a sliced one) is decomposed once per tensor by
comparison (one synchronization, cached on the mask); masks that are not of
that form, ``sliding_window``, ``softcap``, attention sinks (``s_aux``),
``position_bias``, dropout in training and inputs needing gradients fall back to
transformers' own SDPA function (the model's eager function for softcap and
sinks, which SDPA cannot do), with a once-per-reason warning.

Layer configs: ``apply(model, config=SpargeConfig)`` looks up each attention
module by its path in ``model.named_modules()`` (e.g. ``model.layers.0.self_attn``).
"""
from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Dict, Optional

import torch

from .. import _args
from .._fallback import note_fallback
from . import _common
from ._common import CallContext, StatsRecorder

__all__ = ["register", "apply", "remove", "attention_forward", "mask_function", "NAME", "density"]

NAME = "sparge"
_WHERE = "transformers attention"
_INFO = "_sparge_mask_info"

_lock = threading.Lock()
_defaults: Dict[str, Any] = {}
_default_ctx = CallContext(where=_WHERE)
# attention module -> its CallContext (path, layer config, options); filled by apply()
_modules: "weakref.WeakKeyDictionary[torch.nn.Module, CallContext]" = weakref.WeakKeyDictionary()
# model -> (previous attn implementation, its StatsRecorder)
_models: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _tf():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("sparge.integrations.transformers needs the transformers package "
                          "(pip install 'sparge[transformers]')") from e
    return transformers


# --------------------------------------------------------------------------
# The mask function
# --------------------------------------------------------------------------
_mu = None
_signature = None


def _masking_utils():
    """transformers.masking_utils and sdpa_mask's signature, resolved once in
    eager code (register): torch.compile cannot trace an import of
    transformers' lazy modules (torch 2.11 breaks the graph there)."""
    global _mu, _signature
    if _mu is None:
        import inspect

        from transformers import masking_utils

        _signature = inspect.signature(masking_utils.sdpa_mask)
        _mu = masking_utils
    return _mu


def mask_function(*args, **kwargs):
    """transformers' ``sdpa_mask``, plus a note on the returned mask saying how
    it was built, so the attention function can run it natively without reading
    the mask's values."""
    mu = _mu if _mu is not None else _masking_utils()
    mask = mu.sdpa_mask(*args, **kwargs)
    if not isinstance(mask, torch.Tensor):
        return mask
    if args:
        kwargs = _signature.bind(*args, **kwargs).arguments
    fn = kwargs.get("mask_function", mu.causal_mask_function)
    kind = "causal" if fn is mu.causal_mask_function else "full" if fn is mu.bidirectional_mask_function else None
    q_off, kv_off = kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0)
    if kind is None or kwargs.get("local_size") is not None or not isinstance(q_off, (int, torch.SymInt)) \
            or not isinstance(kv_off, (int, torch.SymInt)):
        return mask
    q_len, kv_len = kwargs["q_length"], kwargs["kv_length"]
    pad = kwargs.get("attention_mask")
    if pad is not None:
        if not isinstance(pad, torch.Tensor) or pad.dim() != 2:
            return mask
        pad = mu.prepare_padding_mask(pad, kv_len, kv_off)[:, kv_off:kv_off + kv_len].bool()
    # (torch.compile traces attributes set on a tensor built in the graph, so
    # the note works there too)
    setattr(mask, _INFO, (kind, q_off, kv_off, q_len, kv_len, pad))
    return mask


# --------------------------------------------------------------------------
# Mask analysis
# --------------------------------------------------------------------------
def _decompose(mask: torch.Tensor, Lq: int, Lk: int):
    """(causal alignment or None, key padding [B, Lk] or None, keys to keep)
    for a boolean mask equal to (causal pattern) AND (key padding); None when
    the mask is something else."""
    info = getattr(mask, _INFO, None)
    if info is not None and info[0] != "decomposed":
        kind, q_off, kv_off, q_len, kv_len, pad = info
        if (q_len, kv_len) != (Lq, Lk):
            info = None
        elif kind == "full":
            return None, pad, Lk
        else:
            delta = q_off - kv_off  # query i sees key j iff j <= i + delta
            if delta < 0 or delta + Lq > Lk:
                info = None
            else:
                end = delta + Lq  # keys past `end` are invisible to every query
                if pad is not None and end < Lk:
                    pad = pad[:, :end]
                causal = None if Lq == 1 else "top_left" if delta == 0 else "bottom_right"
                return causal, pad, end
    if info is not None and info[0] == "decomposed":
        return info[1]
    if torch.compiler.is_compiling():
        return None
    # no note: compare against the three candidate patterns (one sync, cached on the mask)
    m = _args.classify_mask(mask, mask.shape[0], 1, Lq, Lk, decompose=True, strict=False)
    result = None
    if m.kind in (_args.KEY_PADDING, _args.CAUSAL_AND_PADDING):
        # a copy, not a view: the result is cached on the mask itself
        result = (None if Lq == 1 and m.causal == "bottom_right" else m.causal, m.key_padding.clone(), Lk)
    try:
        setattr(mask, _INFO, ("decomposed", result))
    except (AttributeError, RuntimeError):  # tensor subclasses that refuse attributes
        pass
    return result


# --------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------
def _fallback(module, query, key, value, attention_mask, reason, dropout, scaling, is_causal, kwargs):
    note_fallback(_WHERE, reason)
    needs_eager = kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
    if needs_eager:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"sparge: {reason}, and {type(module).__name__}'s module has no "
                                      "eager_attention_forward to fall back to")
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            # eager functions add the mask to the scores
            attention_mask = torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """The ``"sparge"`` entry of ``transformers.AttentionInterface``."""
    reason = None
    if kwargs.get("sliding_window") is not None:
        reason = "sliding_window attention"
    elif kwargs.get("softcap") is not None:
        reason = "logit softcapping"
    elif kwargs.get("s_aux") is not None:
        reason = "attention sinks (s_aux)"
    elif kwargs.get("position_bias") is not None:
        reason = "position_bias"
    elif dropout and dropout > 0.0:
        reason = "dropout in training"
    elif _common.needs_grad(query, key, value):
        reason = "inputs that need gradients (sparge is inference-only)"
    elif attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                         or attention_mask.dtype != torch.bool or attention_mask.dim() != 4
                                         or attention_mask.shape[1] != 1):
        reason = "an attention mask that is not a boolean (B, 1, Q, KV) tensor"
    Lq, Lk = query.shape[2], key.shape[2]
    causal, pad, end = None, None, Lk
    if reason is None:
        if attention_mask is None:
            causal_flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            causal = "top_left" if (causal_flag and Lq > 1) else None
        else:
            dec = _decompose(attention_mask, Lq, Lk)
            if dec is None:
                reason = "an attention mask that is not (causal or full) AND key padding"
            else:
                causal, pad, end = dec
    if reason is not None:
        return _fallback(module, query, key, value, attention_mask, reason, dropout, scaling, is_causal, kwargs)
    if end < Lk:
        key, value = key[:, :, :end], value[:, :, :end]
    if pad is not None and pad.shape[0] != query.shape[0]:
        pad = pad.expand(query.shape[0], -1)
    ctx = _modules.get(module, _default_ctx)
    out = _common.attention(query, key, value, causal=causal, key_padding=pad, scale=scaling, ctx=ctx)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------
# Registration and per-model application
# --------------------------------------------------------------------------
def register(**options: Any) -> None:
    """Register ``"sparge"`` with transformers (idempotent). ``options``
    (sparge.attn keywords: ``topk``, ``cdf_threshold``, ``sim_threshold``,
    ``pv_threshold``, ``attention_sink``, ``precision``, ``auto_dense``) become
    the defaults for models not set up with ``apply``."""
    global _default_ctx
    opts = _common.check_options(options, "register")
    tf = _tf()
    AttentionMaskInterface = _masking_utils().AttentionMaskInterface

    with _lock:
        tf.AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, mask_function)
        if options:
            _defaults.clear()
            _defaults.update(opts)
            _default_ctx = CallContext(options=dict(_defaults), where=_WHERE)


def apply(model: torch.nn.Module, config=None, *, record_stats: bool = False, **options: Any) -> torch.nn.Module:
    """Switch ``model`` to sparge attention with ``options`` (sparge.attn
    keywords) and, per attention module, ``config.layer(path)`` of a
    ``SpargeConfig`` (or one ``LayerConfig`` for all). ``record_stats=True``
    records the fraction of blocks computed (``density(model)``). Returns the
    model; ``remove(model)`` undoes it."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    config = _common.check_config(config)
    opts = _common.check_options(options, "apply")
    if not isinstance(record_stats, bool):
        raise TypeError(f"record_stats: expected a bool, got {type(record_stats).__name__}")
    register()
    previous = getattr(model.config, "_attn_implementation", None)
    if model in _models:
        previous = _models[model][0]
    stats = StatsRecorder() if record_stats else None
    for path, mod in model.named_modules():
        _modules[mod] = CallContext(path, _common.layer_config(config, path), opts, stats=stats, where=_WHERE)
    _models[model] = (previous, stats)
    model.set_attn_implementation(NAME)
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``apply``: the model's previous attention implementation (``"sdpa"``
    when it had none or was loaded with ``"sparge"``) and no per-layer settings."""
    entry = _models.pop(model, None)
    for mod in model.modules():
        _modules.pop(mod, None)
    previous = entry[0] if entry is not None else None
    if entry is not None or getattr(model.config, "_attn_implementation", None) == NAME:
        model.set_attn_implementation(previous if previous not in (None, NAME) else "sdpa")
    return model


def density(model: torch.nn.Module) -> Dict[str, Dict[str, float]]:
    """Recorded density per attention module path and in total (``apply(..., record_stats=True)``)."""
    entry = _models.get(model)
    if entry is None or entry[1] is None:
        raise RuntimeError("density: call apply(model, record_stats=True) first")
    return entry[1].summary()
