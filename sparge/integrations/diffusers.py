"""HuggingFace diffusers: the ``"sparge"`` attention backend and processor routing.

    from sparge.integrations import diffusers as sparge_df
    sparge_df.apply(pipe.transformer, topk=0.3, hilbert_grid="auto")   # one line
    ...
    sparge_df.remove(pipe.transformer)                                  # back to what it was

    sparge_df.register(topk=0.5)             # only the backend, for diffusers' own switches:
    transformer.set_attention_backend("sparge")
    with attention_backend("sparge"): ...

Backend. ``register`` adds ``"sparge"`` to diffusers' attention dispatcher.
``AttentionBackendName`` is a closed ``Enum``: the member is added in place
(feature-detected, verified after adding, reused when diffusers already has
one). Backends receive ``[B, S, H, D]`` tensors; sparge reads them in place
(``layout="bshd"``).

``apply(model, config=None, hilbert_grid=None, **attn_options)`` then, for each
attention module (``Attention``/``AttentionModuleMixin``/``MochiAttention``):
processors that go through the dispatcher (those with an ``_attention_backend``
attribute) get the ``"sparge"`` backend; processors that call
``F.scaled_dot_product_attention`` directly (e.g. CogVideoX's) are routed by a
per-thread SDPA scope around the module's forward (``sparge.patch_sdpa``'s
mechanism). For such models the SDPA router stays installed from ``apply``
to ``remove`` (SDPA calls outside the modules' forwards pass through to torch
unchanged), so the hooks only push and pop scopes: no lock in the traced
code, and ``torch.compile(fullgraph=True)`` runs without graph breaks. Forward hooks on each module give every call its module path (the
key into a ``SpargeConfig``), options, Hilbert grid and density recorder.

Hilbert reordering permutes the ``prod(grid)`` visual tokens of Q and of K/V
(together) along a Hilbert curve and un-permutes the output; other tokens stay
where they are. Joint attention orders tokens per model: Flux and CogVideoX
put the text tokens first, SD3 and HunyuanVideo after the image tokens; the
visual tokens of an ``L``-token sequence then start at ``L - prod(grid)`` or
``0``. Pass ``text_first=`` for models not in that table. ``hilbert_grid="auto"``
reads the grid from each forward's inputs for Wan, CogVideoX and Flux
(Flux: from ``img_ids``, one host sync per forward). Calls with a mask or
``is_causal`` are not reordered.
"""
from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .._fallback import note_fallback
from . import _common
from . import sdpa as _sdpa
from ._common import CallContext, StatsRecorder

__all__ = ["register", "apply", "remove", "density", "backend_member", "NAME"]

NAME = "sparge"
_WHERE = "diffusers attention"

# where each joint-attention model puts its text tokens (True: before the visual tokens)
TEXT_FIRST: Dict[str, Optional[bool]] = {
    "FluxTransformer2DModel": True,
    "CogVideoXTransformer3DModel": True,
    "ConsisIDTransformer3DModel": True,
    "SD3Transformer2DModel": False,
    "HunyuanVideoTransformer3DModel": False,
    "WanTransformer3DModel": None,  # self-attention over visual tokens only
}

_lock = threading.Lock()
_default_ctx = CallContext(where=_WHERE)
_local = threading.local()
_applied: "weakref.WeakKeyDictionary[torch.nn.Module, _Applied]" = weakref.WeakKeyDictionary()
_MISSING = object()


def _dispatch():
    """diffusers' attention_dispatch module, or None for versions without one."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("sparge.integrations.diffusers needs the diffusers package "
                          "(pip install 'sparge[diffusers]')") from e
    try:
        from diffusers.models import attention_dispatch as ad
    except ImportError:
        return None
    if not (hasattr(ad, "AttentionBackendName") and hasattr(ad, "_AttentionBackendRegistry")
            and hasattr(ad._AttentionBackendRegistry, "register")):
        return None
    return ad


def _attention_types() -> Tuple[type, ...]:
    types: List[type] = []
    for modname, names in (("diffusers.models.attention_processor", ("Attention", "MochiAttention")),
                           ("diffusers.models.attention", ("AttentionModuleMixin",))):
        try:
            mod = __import__(modname, fromlist=list(names))
        except ImportError:
            continue
        types += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    if not types:
        raise ImportError("sparge.integrations.diffusers: this diffusers has no Attention module class")
    return tuple(types)


# --------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------
def _extend_enum(enum_cls, name: str, value: str):
    """Add member ``name = value`` to a str Enum in place and return it."""
    try:
        return enum_cls(value)
    except ValueError:
        pass
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_sort_order_") or any(hasattr(m, "_sort_order_") for m in enum_cls):
        member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)
    names = enum_cls._member_names_
    if isinstance(names, list):
        names.append(name)
    else:  # pragma: no cover - other Python versions
        enum_cls._member_names_ = list(names) + [name]
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    if enum_cls(value) is not member or enum_cls[name] is not member or value not in \
            {m.value for m in enum_cls.__members__.values()}:
        raise RuntimeError(f"sparge: could not add {name!r} to {enum_cls.__name__} on this Python version")
    return member


def backend_member():
    """diffusers' ``AttentionBackendName`` member for sparge (registers it)."""
    ad = _dispatch()
    if ad is None:
        raise RuntimeError("this diffusers has no attention dispatcher; use sparge.integrations.diffusers.apply, "
                           "which routes the processors' SDPA calls")
    return ad.AttentionBackendName(NAME) if NAME in ad.AttentionBackendName._value2member_map_ else None


def _native(ad, **kwargs):
    fn = ad._AttentionBackendRegistry._backends[ad.AttentionBackendName.NATIVE]
    names = ad._AttentionBackendRegistry._supported_arg_names[ad.AttentionBackendName.NATIVE]
    return fn(**{k: v for k, v in kwargs.items() if k in names})


def sparge_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: Optional[float] = None, enable_gqa: bool = False, _parallel_config=None) -> torch.Tensor:
    """The ``"sparge"`` backend: ``[B, S, H, D]`` in and out."""
    stack = getattr(_local, "stack", None)
    ctx = stack[-1][0] if stack else _default_ctx
    reason = None
    if _parallel_config is not None and getattr(_parallel_config, "context_parallel_config", None) is not None:
        reason = "context parallelism"
    elif _common.needs_grad(query, key, value):
        reason = "inputs that need gradients (sparge is inference-only)"
    if reason is not None:
        note_fallback(_WHERE, reason)
        return _native(_dispatch(), query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, _parallel_config=_parallel_config)
    if enable_gqa is None:
        enable_gqa = False
    return _common.run_sdpa_like(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                 scale=scale, enable_gqa=enable_gqa, layout="bshd", ctx=ctx)


def register(**options: Any):
    """Add the ``"sparge"`` backend to diffusers' dispatcher (idempotent) and
    return its ``AttentionBackendName`` member. ``options`` (sparge.attn
    keywords) become the defaults for calls outside ``apply``'d modules."""
    global _default_ctx
    opts = _common.check_options(options, "register")
    ad = _dispatch()
    if ad is None:
        raise RuntimeError("this diffusers has no attention dispatcher (diffusers.models.attention_dispatch); "
                           "use sparge.integrations.diffusers.apply, which routes the processors' SDPA calls")
    with _lock:
        member = _extend_enum(ad.AttentionBackendName, "SPARGE", NAME)
        reg = ad._AttentionBackendRegistry
        if reg._backends.get(member) is not sparge_backend:
            reg.register(member, constraints=[])(sparge_backend)
        if options:
            _default_ctx = CallContext(options=opts, where=_WHERE)
    return member


# --------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------
def _grid_wan(model, args, kwargs):
    x = kwargs.get("hidden_states", args[0] if args else None)
    p = getattr(model.config, "patch_size", None)
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or p is None or len(p) != 3:
        return None
    _, _, f, h, w = x.shape
    return (f // p[0], h // p[1], w // p[2])


def _grid_cogvideox(model, args, kwargs):
    x = kwargs.get("hidden_states", args[0] if args else None)
    p = getattr(model.config, "patch_size", None)
    if not isinstance(x, torch.Tensor) or x.dim() != 5 or not isinstance(p, int):
        return None
    _, f, _, h, w = x.shape
    pt = getattr(model.config, "patch_size_t", None)
    return ((f + pt - 1) // pt if pt else f, h // p, w // p)


def _grid_flux(model, args, kwargs):
    ids = kwargs.get("img_ids")
    if not isinstance(ids, torch.Tensor) or ids.shape[-1] != 3:
        return None
    ids = ids.reshape(-1, 3)
    h, w = (int(t) + 1 for t in ids[:, 1:].amax(dim=0).tolist())  # one host sync per forward
    return (h, w) if h * w == ids.shape[0] else None


AUTO_GRID: Dict[str, Callable] = {
    "WanTransformer3DModel": _grid_wan,
    "CogVideoXTransformer3DModel": _grid_cogvideox,
    "FluxTransformer2DModel": _grid_flux,
}


class _Applied:
    def __init__(self):
        self.hooks: List[Any] = []
        self.backends: List[Tuple[Any, Any]] = []  # (processor, its previous _attention_backend)
        self.contexts: List[CallContext] = []
        self.stats: Optional[StatsRecorder] = None
        self.router_held = False  # the SDPA router installed for the model's lifetime


def _enter(ctx: CallContext, state: "_Applied", module, args):
    proc = getattr(module, "processor", None)
    routed = not hasattr(proc, "_attention_backend")
    held = routed and state.router_held
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append((ctx, routed, held))
    if held:
        _sdpa.push(ctx)  # no lock: this runs inside code torch.compile traces
    elif routed:
        _sdpa.enter(ctx)


def _exit(ctx: CallContext, module, args, output):
    stack = getattr(_local, "stack", None)
    for i in range(len(stack or ()) - 1, -1, -1):
        if stack[i][0] is ctx:
            _, routed, held = stack.pop(i)
            if held:
                _sdpa.pop(ctx)
            elif routed:
                _sdpa.exit(ctx)
            break


def _resolve_model(model) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model
    for attr in ("transformer", "unet"):  # a pipeline
        m = getattr(model, attr, None)
        if isinstance(m, torch.nn.Module):
            return m
    raise TypeError(f"model: expected a diffusers model (torch.nn.Module) or a pipeline with .transformer/.unet, "
                    f"got {type(model).__name__}")


def apply(model, config=None, hilbert_grid=None, *, text_first: Optional[bool] = None, record_stats: bool = False,
          **attn_options: Any) -> torch.nn.Module:
    """Run every attention of ``model`` (a diffusers model, or a pipeline's
    transformer/unet) through sparge.

    ``config``: a ``SpargeConfig`` (looked up by module path, e.g.
    ``transformer_blocks.0.attn1``) or one ``LayerConfig``. ``hilbert_grid``:
    the visual token grid ``(T, H, W)``/``(H, W)`` in tokens (after patching), or
    ``"auto"``. ``text_first``: where joint-attention models put the text tokens
    (default: known per model class). ``record_stats=True`` records the
    fraction of blocks computed (``density(model)``). ``attn_options``:
    sparge.attn keywords (``topk``, ``cdf_threshold``, ``sim_threshold``,
    ``pv_threshold``, ``attention_sink``, ``precision``, ``auto_dense``).
    Returns the model; ``remove(model)`` undoes everything."""
    target = _resolve_model(model)
    config = _common.check_config(config)
    opts = _common.check_options(attn_options, "apply")
    auto = isinstance(hilbert_grid, str)
    if auto and hilbert_grid != "auto":
        raise ValueError(f"hilbert_grid: expected (T, H, W), (H, W), 'auto' or None, got {hilbert_grid!r}")
    grid = None if auto else _common.check_grid(hilbert_grid)
    if text_first is not None and not isinstance(text_first, bool):
        raise TypeError(f"text_first: expected a bool or None, got {type(text_first).__name__}")
    if not isinstance(record_stats, bool):
        raise TypeError(f"record_stats: expected a bool, got {type(record_stats).__name__}")
    cls_name = type(target).__name__
    if text_first is None:
        text_first = TEXT_FIRST.get(cls_name)
    grid_fn = AUTO_GRID.get(cls_name) if auto else None
    if auto and grid_fn is None:
        raise ValueError(f"hilbert_grid: 'auto' knows {sorted(AUTO_GRID)}, not {cls_name}; pass the grid in tokens")

    remove(target)
    ad = _dispatch()
    member = register() if ad is not None else None
    state = _Applied()
    state.stats = StatsRecorder() if record_stats else None
    mods = _common.find_modules(target, _attention_types())
    if not mods:
        raise ValueError(f"model: {cls_name} has no diffusers attention modules")
    for path, mod in mods:
        ctx = CallContext(path, _common.layer_config(config, path), opts, grid, text_first, state.stats, _WHERE)
        state.contexts.append(ctx)
        proc = getattr(mod, "processor", None)
        if member is not None and proc is not None and hasattr(proc, "_attention_backend"):
            if all(p is not proc for p, _ in state.backends):  # processors may be shared by modules
                state.backends.append((proc, proc.__dict__.get("_attention_backend", _MISSING)))
            proc._attention_backend = member
        if proc is not None and not hasattr(proc, "_attention_backend") and not state.router_held:
            # a processor that calls SDPA itself: keep the router installed while
            # the model is applied, so the hooks only push and pop scopes
            _sdpa.hold()
            state.router_held = True
        state.hooks.append(mod.register_forward_pre_hook(functools.partial(_enter, ctx, state)))
        state.hooks.append(mod.register_forward_hook(functools.partial(_exit, ctx), always_call=True))
    if grid_fn is not None:
        def set_grid(module, args, kwargs):
            g = grid_fn(module, args, kwargs)
            for c in state.contexts:
                c.grid = g
        state.hooks.append(target.register_forward_pre_hook(set_grid, with_kwargs=True))
    _applied[target] = state
    return target


def remove(model) -> torch.nn.Module:
    """Undo ``apply`` (hooks, processor backends), and drop a ``"sparge"``
    backend left on the model's processors by ``set_attention_backend("sparge")``
    (diffusers then uses its default backend again)."""
    target = _resolve_model(model)
    state = _applied.pop(target, None)
    if state is not None:
        for h in state.hooks:
            h.remove()
        if state.router_held:
            _sdpa.unhold()
            state.router_held = False
        for proc, prev in state.backends:
            if prev is _MISSING:
                proc.__dict__.pop("_attention_backend", None)
            else:
                proc._attention_backend = prev
    ad = _dispatch()
    if ad is not None and NAME in ad.AttentionBackendName._value2member_map_:
        member = ad.AttentionBackendName(NAME)
        for mod in target.modules():
            proc = getattr(mod, "processor", None)
            if proc is not None and getattr(proc, "_attention_backend", None) == member:
                proc._attention_backend = None
        reg = ad._AttentionBackendRegistry
        if reg._active_backend == member:
            from diffusers.utils.constants import DIFFUSERS_ATTN_BACKEND

            reg.set_active_backend(ad.AttentionBackendName(DIFFUSERS_ATTN_BACKEND))
    return target


def density(model) -> Dict[str, Dict[str, float]]:
    """Recorded density per attention module path and in total (``apply(..., record_stats=True)``)."""
    state = _applied.get(_resolve_model(model))
    if state is None or state.stats is None:
        raise RuntimeError("density: call apply(model, record_stats=True) first")
    return state.stats.summary()
