"""One argument path for every entry point: ``resolve_call`` checks an
attention call's arguments and returns the resolved call (``Call``), and
``classify_mask`` says what an ``attn_mask`` is. ``sparge.attn``,
``predict``, ``block_sparse_attn``, calibration and the integrations all go
through here, so a rule (a message, a default, a broadcast) exists once.

Bad input raises ValueError/TypeError naming the argument. Nothing here
imports inside a function: ``attn`` runs under ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, NamedTuple, Optional, Tuple, Union

import torch

from . import _lib, reference
from . import config as _config

Hyper = Union[float, torch.Tensor]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PRECISIONS = ("auto", "fp16", "bf16", "int8")
LAYOUTS = ("bhsd", "bshd")
ALIGNMENTS = ("top_left", "bottom_right")


class _DefaultTopk(float):
    """topk's default (0.5), distinguishable from a topk the caller passed."""


TOPK_DEFAULT = _DefaultTopk(0.5)


class _Absent:
    """An argument the entry point does not have (prediction has no value,
    the sparse kernel alone no block selection)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()


def compiling() -> bool:
    return torch.compiler.is_compiling()


# --------------------------------------------------------------------------
# Single arguments
# --------------------------------------------------------------------------
# The C ABI's largest dimension (MAX_DIM_SIZE in csrc/api.c): every count fits int32 loops.
MAX_DIM_SIZE = (1 << 31) - 1


def check_tensor(t, name: str) -> None:
    """An attention input: a float tensor of rank >= 3 with no zero-size dimension."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 3:
        raise ValueError(f"{name}: expected a tensor of rank >= 3, (N, ..., L, E) as in SDPA, "
                         f"got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {t.dtype} is not float16, bfloat16 or float32")
    if any(s == 0 for s in t.shape):
        raise ValueError(f"{name}: has a zero-size dimension, shape {tuple(t.shape)}")


def _check_sizes(t: torch.Tensor, name: str) -> None:
    for i, s in enumerate(t.shape):
        if s > MAX_DIM_SIZE:
            raise ValueError(f"{name}: dimension {i} of [B, H, L, D] = {tuple(t.shape)} is {s}, more than "
                             f"sparge's limit {MAX_DIM_SIZE}")


def _to_4d(t: torch.Tensor, rank: int) -> torch.Tensor:
    """(N, L, E) -> (N, 1, L, E); (N, ..., H, L, E) -> (N*..., H, L, E): views
    (``flatten`` copies only when the leading strides do not allow a view)."""
    if rank == 3:
        return t.unsqueeze(1)
    if rank == 4:
        return t
    return t.flatten(0, rank - 4)


def flatten_mask(m: torch.Tensor, lead: Tuple[int, ...], name: str) -> torch.Tensor:
    """A mask broadcastable to ``lead + (X, Y)`` (``lead``: the query's shape
    without its last two dimensions) as a 4-D mask broadcastable to the
    flattened call's [B, H, X, Y]; dimensions of size 1 stay size 1."""
    r = len(lead) + 2
    if m.dim() > r:
        raise ValueError(f"{name}: has {m.dim()} dimensions, more than the query's {r}")
    m = m.reshape((1,) * (r - m.dim()) + tuple(m.shape))
    if r == 3:
        return m.unsqueeze(1)
    nb = r - 3  # batch dimensions that flatten into B
    for i in range(nb):
        if m.shape[i] not in (1, lead[i]):
            raise ValueError(f"{name}: shape {tuple(m.shape)} does not broadcast to the query's leading "
                             f"dimensions {tuple(lead)} (dimension {i})")
    if all(s == 1 for s in m.shape[:nb]):
        return m.reshape((1,) + tuple(m.shape[nb:]))
    return m.expand(tuple(lead[:nb]) + tuple(m.shape[nb:])).flatten(0, nb - 1)


def check_qkv(q, k, v, layout: str, enable_gqa: bool):
    """Returns ([B, H, L, D] views of q, k, v (no copies), lead). ``v`` ABSENT:
    no value (prediction; returned as None). Inputs of rank 3 ``(N, L, E)`` are
    one head; rank > 4 ``(N, ..., H, L, E)`` flatten their leading dimensions
    into the batch. ``lead`` is the query's shape without (L, E) for inputs
    that are not 4-D (the output takes it back), None for 4-D ones."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    check_flag(enable_gqa, "enable_gqa")
    check_tensor(q, "query")
    check_tensor(k, "key")
    has_v = v is not ABSENT
    if has_v:
        check_tensor(v, "value")
    else:
        v = None
    rank = q.dim()
    for t, name in ((k, "key"), (v, "value")):
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from query's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device} but query is on {q.device}")
        if t.dim() != rank:
            raise ValueError(f"{name}: has {t.dim()} dimensions, query has {rank}")
        if rank > 4 and t.shape[:-3] != q.shape[:-3]:
            raise ValueError(f"{name}: leading dimensions {tuple(t.shape[:-3])} differ from query's "
                             f"{tuple(q.shape[:-3])}")
    lead = None
    if rank != 4:
        if layout == "bshd":
            raise ValueError(f"layout: 'bshd' takes 4-D [B, L, H, D] inputs; query has {rank} dimensions "
                             "(inputs of other ranks are (N, ..., L, E), as in SDPA)")
        lead = tuple(q.shape[:-2])
        q, k = _to_4d(q, rank), _to_4d(k, rank)
        v = _to_4d(v, rank) if v is not None else None
    if layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.transpose(1, 2) if v is not None else None
    # before anything is allocated for the call (one max in the common case)
    if max(max(q.shape), max(k.shape), max(v.shape) if v is not None else 0) > MAX_DIM_SIZE:
        for t, name in ((q, "query"), (k, "key"), (v, "value")):
            if t is not None:
                _check_sizes(t, name)
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
    return q, k, v, lead


def check_number(x, name: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
                 allow_inf: bool = False) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a float, got {type(x).__name__}")
    x = float(x)
    if math.isnan(x) or (math.isinf(x) and not allow_inf):
        raise ValueError(f"{name}: {x} is not finite")
    if x < lo or x > hi or (lo_open and x == lo):
        lo_b = "(" if lo_open else "["
        raise ValueError(f"{name}: {x} is outside {lo_b}{lo}, {hi}]")


def head_param(x: Hyper, name: str, H: int, device: torch.device, lo: float = -math.inf, hi: float = math.inf,
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
        if x.device.type == "cpu" and not compiling():  # checking device data would synchronize
            bad = torch.isnan(t) | (torch.isinf(t) & (not allow_inf)) | (t < lo) | (t > hi) | ((t == lo) & lo_open)
            if bool(bad.any()):
                raise ValueError(f"{name}: per-head values must lie in {'(' if lo_open else '['}{lo}, {hi}] "
                                 f"and be {'non-NaN' if allow_inf else 'finite'}, got {x.tolist()}")
        return t.contiguous()
    check_number(x, name, lo, hi, lo_open, allow_inf)
    return _constant_vector(float(x), H, device)


_constants: Dict[Tuple[float, int, torch.device], torch.Tensor] = {}


def _constant_vector(x: float, H: int, device: torch.device) -> torch.Tensor:
    """A read-only float32 [H] tensor filled with x, cached per device so that a
    call makes no fill launches (not while compiling or capturing a graph,
    where a cached tensor could outlive its memory pool)."""
    if compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.full((H,), x, dtype=torch.float32, device=device)
    key = (x, H, device)
    t = _constants.get(key)
    if t is None:
        if len(_constants) > 512:
            _constants.clear()
        t = _constants[key] = torch.full((H,), x, dtype=torch.float32, device=device)
    return t


def check_precision(precision) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")


def check_dim(x, name: str) -> int:
    """A size argument: an int (not a bool, float or string) in 1..MAX_DIM_SIZE."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__} {x!r}")
    if not 1 <= x <= MAX_DIM_SIZE:
        raise ValueError(f"{name}: {x} is outside 1..{MAX_DIM_SIZE}")
    return x


# How the sparse kernel computes a call (compute_path)
NATIVE = "native"    # in the input's dtype: 16-bit inputs anywhere, float32 on the CPU (fp32 arithmetic)
CAST_16 = "cast16"   # float32 on CUDA with precision="fp16"/"bf16": cast to that type (opt-in, 16-bit accuracy)
PRECISE = "precise"  # float32 on CUDA with precision="auto": torch SDPA in float32 (a counted precision fallback)

FP32_CUDA_REASON = ("float32 inputs on CUDA: sparge's CUDA kernels compute in 16 bits, so torch SDPA runs the "
                    "call in float32 (pass precision='bf16' or 'fp16' to run the sparse kernel in 16 bits)")


def compute_path(device_type: str, dtype: torch.dtype, precision: str) -> str:
    """Which arithmetic a call gets: float32 inputs meet float32 tolerance by
    default on every backend. The CPU kernels compute in float32 whatever the
    input; the CUDA kernels have 16-bit operands, so float32 inputs there take
    torch's float32 SDPA unless ``precision`` opts into 16 bits (``"fp16"`` /
    ``"bf16"``: cast in, compute, cast the output back)."""
    if device_type != "cuda" or dtype != torch.float32:
        return NATIVE
    if precision in ("fp16", "bf16"):
        return CAST_16
    return PRECISE


def check_flag(x, name: str) -> bool:
    if x is True or x is False:
        return x
    if not isinstance(x, torch.SymBool):
        raise TypeError(f"{name}: expected a bool, got {type(x).__name__}")
    return x


def resolve_scale(scale, D: int) -> float:
    if scale is None:
        return D ** -0.5
    check_number(scale, "scale")
    return float(scale)


def causal_mode(is_causal: bool, causal_alignment: str) -> Optional[str]:
    check_flag(is_causal, "is_causal")
    if causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment: expected one of {ALIGNMENTS}, got {causal_alignment!r}")
    return causal_alignment if is_causal else None


def selection(topk, cdf_threshold):
    """(select_mode, value) from topk / cdf_threshold; exactly one is used."""
    topk_given = topk is not TOPK_DEFAULT and topk is not None
    if cdf_threshold is not None:
        if topk_given:
            raise ValueError("topk: give either topk or cdf_threshold, not both")
        return _lib.SELECT_CDF, cdf_threshold
    if topk is None:
        raise ValueError("topk: one of topk and cdf_threshold is required")
    return _lib.SELECT_TOPK, (0.5 if topk is TOPK_DEFAULT else topk)


def check_key_padding_mask(key_padding_mask, B: int, Lk: int, device) -> Optional[torch.Tensor]:
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


def check_attn_mask_dtype(attn_mask, query_dtype: torch.dtype) -> None:
    """torch SDPA's rule: a bool mask, a float32 one, or one of the query's
    dtype; anything else (int64, float64, ...) is a TypeError naming attn_mask."""
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, torch.float32, query_dtype):
        raise TypeError(f"attn_mask: dtype {attn_mask.dtype} is not supported: expected bool, float32 or the "
                        f"query's dtype {query_dtype} (as torch SDPA)")


# --------------------------------------------------------------------------
# The mask classifier
# --------------------------------------------------------------------------
NO_MASK = "none"
KEY_PADDING = "key_padding"                # broadcastable to [B, 1, 1, Lk]: runs natively
CAUSAL_AND_PADDING = "causal_and_padding"  # (causal pattern or none) AND key padding, spelled out over queries
OTHER = "other"                            # anything else: the SDPA fallback


class MaskInfo(NamedTuple):
    """What an ``attn_mask`` is, for a call of shape [B, H, Lq, Lk]."""

    kind: str
    key_padding: Optional[torch.Tensor] = None  # [B, Lk] bool, True = attend (KEY_PADDING, CAUSAL_AND_PADDING)
    causal: Optional[str] = None                # CAUSAL_AND_PADDING: the pattern's alignment, None for none
    reason: Optional[str] = None                # OTHER: why it needs the SDPA fallback


def classify_mask(attn_mask, B: int, H: int, Lq: int, Lk: int, *, decompose: bool = False,
                  strict: bool = True) -> MaskInfo:
    """What ``attn_mask`` is. A mask that is not a tensor, has more than 4
    dimensions or does not broadcast to [B, H, Lq, Lk] raises (``strict``) or
    is OTHER. A boolean mask that varies over queries is compared against the
    causal patterns only with ``decompose`` (reads its values: one host
    synchronization)."""
    if attn_mask is None:
        return MaskInfo(NO_MASK)
    if not isinstance(attn_mask, torch.Tensor):
        if strict:
            raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        return MaskInfo(OTHER, reason="an attn_mask that is not a tensor")
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() > 4:
        if strict:
            raise ValueError(f"attn_mask: has {attn_mask.dim()} dimensions, at most 4 broadcast to [B, H, Lq, Lk]")
        return MaskInfo(OTHER, reason="an attn_mask of more than 4 dimensions")
    full = (1,) * (4 - len(shape)) + shape
    for have, want, what in zip(full, (B, H, Lq, Lk), ("B", "H", "Lq", "Lk")):
        if have not in (1, want):
            if strict:
                raise ValueError(f"attn_mask: shape {shape} does not broadcast to [B, H, Lq, Lk] = "
                                 f"[{B}, {H}, {Lq}, {Lk}] (dimension {what})")
            return MaskInfo(OTHER, reason="an attn_mask that does not broadcast to the call")
    if attn_mask.dtype != torch.bool:
        return MaskInfo(OTHER, reason="a float attn_mask (only boolean key-padding masks run natively)")
    if full[1] == 1 and full[2] == 1:
        return MaskInfo(KEY_PADDING, key_padding=attn_mask.reshape(full[0], Lk).expand(B, Lk))
    if decompose:
        dec = decompose_mask(attn_mask, Lq, Lk)
        if dec is not None:
            return MaskInfo(CAUSAL_AND_PADDING, key_padding=dec[1].expand(B, Lk), causal=dec[0])
    return MaskInfo(OTHER, reason="a boolean attn_mask that varies over heads or queries (only key padding "
                                  "runs natively)")


def decompose_mask(mask: torch.Tensor, Lq: int, Lk: int):
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


# --------------------------------------------------------------------------
# The resolved call
# --------------------------------------------------------------------------
@dataclass
class Call:
    """One attention call, checked and resolved: what every entry point
    computes from its arguments before choosing a kernel or a fallback."""

    q: torch.Tensor                      # [B, Hq, Lq, D], a view of query (no copy)
    k: torch.Tensor                      # [B, Hkv, Lk, D]
    v: Optional[torch.Tensor]            # [B, Hkv, Lk, Dv]; None for prediction alone
    layout: str                          # the caller's layout, which the output goes back to
    causal: Optional[str]                # None, "top_left" or "bottom_right" (the alignment)
    scale: float
    precision: str
    dropout_p: float = 0.0
    attn_mask: Optional[torch.Tensor] = None     # as given (the SDPA fallback takes it)
    mask: MaskInfo = MaskInfo(NO_MASK)           # what attn_mask is
    key_padding: Optional[torch.Tensor] = None   # [B, Lk] bool, True = attend (from either mask argument)
    select_mode: int = _lib.SELECT_TOPK
    selection: Any = None                        # topk or cdf_threshold as given (float or tensor)
    select_param: Optional[torch.Tensor] = None  # [Hq] float32 tau or rho
    sim_threshold: Optional[torch.Tensor] = None  # [Hq] float32
    pv_threshold: Optional[torch.Tensor] = None   # [Hq] float32; None: PV skip off
    return_lse: bool = False
    return_stats: bool = False
    lead: Optional[Tuple[int, ...]] = None        # the query's shape without (L, E) when it is not 4-D

    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def Hq(self) -> int:
        return self.q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def Lq(self) -> int:
        return self.q.shape[2]

    @property
    def Lk(self) -> int:
        return self.k.shape[2]

    @property
    def D(self) -> int:
        return self.q.shape[3]

    @property
    def Dv(self) -> int:
        return self.v.shape[3] if self.v is not None else self.q.shape[3]

    @property
    def causal_code(self) -> int:
        return _lib.CAUSAL_CODES[self.causal]

    def _kernel_status(self, device: Optional[torch.device] = None, precision: Optional[str] = None):
        """(C status, message, (block_q, block_k, pv_group, precision code)),
        cached per signature and constant under torch.compile. Nothing is
        raised here: Dynamo cannot build sparge's exception classes, so a
        NOT_SUPPORTED fallback inside torch.compile must not go through one."""
        dev_type, dev_id = _lib.device_codes(self.q.device if device is None else device)
        return _lib._block_shape_const(dev_type, dev_id, int(self.D), int(self.Dv), _lib.dtype_code(self.q.dtype),
                                       _lib.PRECISION_CODES[self.precision if precision is None else precision])

    def kernel(self) -> Tuple[int, int, int, int]:
        """(block_q, block_k, pv_group, precision code) of the kernel for this call."""
        return _lib.kernel_config(self.q.device, self.D, self.Dv, self.q.dtype, self.precision)

    def native_reason(self) -> Optional[str]:
        """None when a sparge kernel runs this call, else why not."""
        status, message, _ = self._kernel_status()
        if status == _lib.SUCCESS:
            return None
        if status == _lib.NOT_SUPPORTED:
            return message
        raise ValueError(f"block_shape: {message}")

    def precision_reason(self) -> Optional[str]:
        """None when the kernel meets this call's precision, else why torch SDPA runs it (``compute_path``)."""
        if compute_path(self.q.device.type, self.q.dtype, self.precision) == PRECISE:
            return FP32_CUDA_REASON
        return None

    def block_shape(self, block_size=None) -> Tuple[int, int]:
        """(BQ, BK): ``block_size`` when given, else the kernel's (the CPU
        backend's where this device has no kernel: the reference uses it)."""
        if block_size is not None:
            if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
                    or not all(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= MAX_DIM_SIZE
                               for b in block_size)):
                raise ValueError(f"block_size: expected (BQ, BK) ints in 1..{MAX_DIM_SIZE}, got {block_size!r}")
            return int(block_size[0]), int(block_size[1])
        status, message, shape = self._kernel_status()
        if status == _lib.NOT_SUPPORTED:
            status, message, shape = self._kernel_status(torch.device("cpu"), "auto")
        if status == _lib.NOT_SUPPORTED:
            raise _lib.NotSupportedError(status, message)
        if status != _lib.SUCCESS:
            raise ValueError(f"block_shape: {message}")
        return shape[0], shape[1]

    def unflatten(self, t: Optional[torch.Tensor], tail: int) -> Optional[torch.Tensor]:
        """A [B, H, ...] result with ``tail`` trailing dimensions back over the
        caller's leading dimensions (``lead + tail``; rank-3 inputs have no head
        dimension). Results not asked for (None, or empty 1-D) pass through."""
        if t is None or self.lead is None or t.dim() != 2 + tail:
            return t
        return t.reshape(self.lead + tuple(t.shape[t.dim() - tail:]))

    def finish(self, out: torch.Tensor, lse=None, stats=None):
        """The caller's result: ``out`` back in its layout, with ``lse`` and
        the stats dict when asked."""
        if self.layout == "bshd":
            out = out.transpose(1, 2)  # [B, Lq, Hq, Dv]
        if self.lead is not None:  # back to the caller's (N, ..., L, Ev)
            out = self.unflatten(out, 2)
            lse = self.unflatten(lse, 1)
            stats = self.unflatten(stats, 1)
        if not self.return_lse and not self.return_stats:
            return out
        res = (out,)
        if self.return_lse:
            res += (lse,)
        if self.return_stats:
            res += (stats_dict(stats),)
        return res


STAT_NAMES = ("blocks_allowed", "blocks_kept", "pv_units", "pv_skipped")


def stats_dict(stats: torch.Tensor) -> Dict[str, torch.Tensor]:
    d = {name: stats[..., i] for i, name in enumerate(STAT_NAMES)}
    d["density"] = d["blocks_kept"].double() / d["blocks_allowed"].clamp(min=1).double()
    d["pv_skip_fraction"] = d["pv_skipped"].double() / d["pv_units"].clamp(min=1).double()
    return d


def resolve_call(query, key, value, *, layout: str = "bhsd", enable_gqa: bool = False, is_causal: bool = False,
                 causal_alignment: str = "top_left", scale=None, precision: str = "auto", dropout_p: float = 0.0,
                 attn_mask=None, key_padding_mask=None, config: Any = None, topk=ABSENT, cdf_threshold=None,
                 sim_threshold=ABSENT, pv_threshold: Optional[Hyper] = None, return_lse: bool = False,
                 return_stats: bool = False) -> Call:
    """Check an attention call's arguments and resolve them: [B, H, L, D]
    views, the causal alignment, the scale, the key padding from either mask
    argument, per-head float32 [Hq] hyperparameters (``config`` overriding
    the keywords). ``value=None``: prediction alone; ``topk``/``sim_threshold``
    left ``ABSENT``: the entry point selects no blocks (the sparse kernel alone).
    Inputs of rank 3 or > 4 are resolved to 4-D views (``Call.lead`` keeps
    their shape); ``attn_mask`` then broadcasts to ``(N, ..., Lq, Lk)`` as in
    SDPA and ``key_padding_mask`` is ``[B, Lk]`` over the flattened batch."""
    q, k, v, lead = check_qkv(query, key, value, layout, enable_gqa)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    if config is not None:
        over = _config.resolve(config, Hq, q.device)
        sim_threshold = over.get("sim_threshold", sim_threshold)
        pv_threshold = over.get("pv_threshold", pv_threshold)
        if over.get("cdf_threshold") is not None:
            cdf_threshold, topk = over["cdf_threshold"], TOPK_DEFAULT
        elif over.get("topk") is not None:
            topk, cdf_threshold = over["topk"], None
    causal = causal_mode(is_causal, causal_alignment)
    s = resolve_scale(scale, D)
    check_number(dropout_p, "dropout_p", 0.0, 1.0)
    if dropout_p >= 1.0:
        raise ValueError(f"dropout_p: {dropout_p} must be < 1")
    if attn_mask is not None:
        check_attn_mask_dtype(attn_mask, q.dtype)
        if lead is not None:
            attn_mask = flatten_mask(attn_mask, lead, "attn_mask")
    call = Call(q, k, v, layout, causal, s, precision, dropout_p=dropout_p, attn_mask=attn_mask, lead=lead)
    if topk is not ABSENT:
        call.select_mode, call.selection = selection(topk, cdf_threshold)
        call.select_param = head_param(call.selection, "topk" if call.select_mode == _lib.SELECT_TOPK
                                       else "cdf_threshold", Hq, q.device, 0.0, 1.0, lo_open=True)
    if sim_threshold is not ABSENT:
        call.sim_threshold = head_param(sim_threshold, "sim_threshold", Hq, q.device)
    if pv_threshold is not None:
        call.pv_threshold = head_param(pv_threshold, "pv_threshold", Hq, q.device, 0.0, allow_inf=True)
    call.return_lse = check_flag(return_lse, "return_lse")
    call.return_stats = check_flag(return_stats, "return_stats")
    check_precision(precision)
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask: cannot be combined with is_causal=True (as in SDPA)")
        call.mask = classify_mask(attn_mask, B, Hq, Lq, Lk)
        call.key_padding = call.mask.key_padding
    if key_padding_mask is not None:
        if attn_mask is not None:
            raise ValueError("key_padding_mask: give either attn_mask or key_padding_mask, not both")
        call.key_padding = check_key_padding_mask(key_padding_mask, B, Lk, q.device)
    return call
