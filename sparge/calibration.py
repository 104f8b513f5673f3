"""Calibration: per-layer, per-head hyperparameters in minutes.

For every attention layer and head, choose θ (``sim_threshold``), τ or ρ
(``cdf_threshold`` or ``topk``) and λ (``pv_threshold``) that give the lowest
density (fraction of blocks computed) while the head's output error against
dense attention stays under a target.

How the search is batched (one attention call of a layer at a time):

1. Every head is copied once per θ candidate into a wider query tensor
   ``[B, H*C, L, D]`` whose copies share the original K/V through GQA, so one
   sparse-attention launch evaluates all heads x all θ candidates, each copy
   with its own per-head τ (or ρ).
2. τ (or ρ) is found by bisection run in parallel for every (head, θ): each
   step is one launch; lower and upper bounds move on the device with
   ``torch.where``, so the search never synchronizes with the host. τ is
   bisected on ``-log10(1 - τ)`` (the useful values crowd near 1), ρ linearly.
   The stage aims at ``target * (1 - pv_share)``, leaving the rest for PV skip.
3. Per head, the θ whose best τ computes the fewest blocks wins.
4. λ: all candidates in one launch; the smallest λ (most skipping) whose
   error stays under ``target`` wins, else PV skip stays off.
5. The chosen (θ, τ, λ) is run once more; a head over the target (the search
   assumes error falls as τ rises, which holds only roughly) is set dense.

Across calls (samples, diffusion steps) of one layer, values are merged
conservatively: per head the maximum θ, τ (ρ) and λ, each of which can only
compute more. Captured calls are calibrated as they happen and then dropped,
so memory stays at one call's tensors; the model itself always receives the
exact dense output while calibrating.

Error metrics (per head, over batch, rows and channels): ``"l1"`` relative L1
``Σ|O-R| / Σ|R|``, ``"rmse"`` relative RMSE ``‖O-R‖ / ‖R‖``, ``"cosine"``
``1 - cos(O, R)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import _args, _fallback
from . import functional as _fn
from .config import LayerConfig, SpargeConfig
from .integrations import sdpa as _sdpa
from .integrations._common import CallContext

__all__ = ["calibrate", "calibrate_layer", "CalibrationResult", "LayerCalibration"]

log = logging.getLogger(__name__)

METRICS = ("l1", "rmse", "cosine")
MODES = ("cdf", "topk")
DEFAULT_SIM_CANDIDATES = "auto"
_AUTO_SIM_QUANTILES = (0.02, 0.05, 0.15)
DEFAULT_PV_CANDIDATES = (20.0, 14.0, 10.0, 8.0, 6.0, 4.0)
_CDF_X_MAX = 4.0  # tau = 1 - 10**-x, x in (0, 4]: tau up to 0.9999


@dataclass
class LayerCalibration:
    """One calibrated attention call: the chosen values per head, what they
    achieved on this call, and every point the search evaluated."""

    path: str
    num_heads: int
    mode: str
    sim_threshold: torch.Tensor      # [H]
    selection: torch.Tensor          # [H] tau or rho
    pv_threshold: torch.Tensor       # [H], inf = off
    density: torch.Tensor            # [H] achieved, chosen values
    error: torch.Tensor              # [H] achieved, chosen values
    pv_skip: torch.Tensor            # [H] fraction of PV units skipped
    curve: Dict[str, torch.Tensor] = field(default_factory=dict)  # "sim" [H, C], "selection"/"density"/"error" [S, H, C]
    device_type: str = "cpu"

    def layer_config(self) -> LayerConfig:
        return _to_layer_config(self.mode, self.sim_threshold, self.selection, self.pv_threshold)


def _up(x: float, digits: int = 6) -> float:
    """x rounded up (towards computing more) to a readable decimal."""
    return math.ceil(x * 10 ** digits - 1e-3) / 10 ** digits


def _to_layer_config(mode, sim, sel, pv) -> LayerConfig:
    pv_list = [None if math.isinf(x) else _up(x, 4) for x in pv.tolist()]
    kw = {"cdf_threshold" if mode == "cdf" else "topk": [min(1.0, _up(x)) for x in sel.tolist()]}
    return LayerConfig(sim_threshold=[_up(x, 4) for x in sim.tolist()],
                       pv_threshold=pv_list if any(x is not None for x in pv_list) else None, **kw)


@dataclass
class CalibrationResult:
    """The merged ``config`` and the per-call records behind it."""

    config: SpargeConfig
    records: List[LayerCalibration]
    target: float
    metric: str
    mode: str
    skipped: Dict[str, int] = field(default_factory=dict)  # reason -> calls not calibrated

    def summary(self) -> Dict[str, Dict[str, float]]:
        """Per layer: mean density and max error over heads and calls (of the
        per-call chosen values), mean PV-skip fraction, number of calls."""
        out: Dict[str, Dict[str, float]] = {}
        for r in self.records:
            s = out.setdefault(r.path, {"density": 0.0, "error": 0.0, "pv_skip": 0.0, "calls": 0})
            s["density"] += r.density.mean().item()
            s["pv_skip"] += r.pv_skip.mean().item()
            s["error"] = max(s["error"], r.error.max().item())
            s["calls"] += 1
        for s in out.values():
            s["density"] /= s["calls"]
            s["pv_skip"] /= s["calls"]
        return out

    def save(self, path) -> None:
        self.config.save(path)


# --------------------------------------------------------------------------
# One call: batched search over heads x candidates
# --------------------------------------------------------------------------
def _head_errors(out: torch.Tensor, ref: torch.Tensor, metric: str) -> torch.Tensor:
    """out [B, H, C, L, Dv], ref [B, H, L, Dv] -> error [H, C] (float32)."""
    B, H, C = out.shape[:3]
    r = ref.float()
    err = torch.empty(H, C, dtype=torch.float32, device=out.device)
    r_abs = r.abs().sum(dim=(0, 2, 3)).clamp_min(1e-30)
    r_sq = r.square().sum(dim=(0, 2, 3)).clamp_min(1e-30)
    for c in range(C):  # one candidate at a time bounds the fp32 temporaries
        o = out[:, :, c].float()
        if metric == "l1":
            err[:, c] = (o - r).abs().sum(dim=(0, 2, 3)) / r_abs
        elif metric == "rmse":
            err[:, c] = ((o - r).square().sum(dim=(0, 2, 3)) / r_sq).sqrt()
        else:
            dot = (o * r).sum(dim=(0, 2, 3))
            err[:, c] = 1.0 - dot / (o.square().sum(dim=(0, 2, 3)).sqrt() * r_sq.sqrt()).clamp_min(1e-30)
    return err


class _Problem:
    """One attention call's tensors and options; evaluates [H, C] candidate grids."""

    def __init__(self, q, k, v, ref, attn_kwargs: Dict[str, Any], metric: str, mode: str):
        self.q, self.k, self.v, self.ref = q, k, v, ref
        self.kw = attn_kwargs
        self.metric, self.mode = metric, mode
        self._wide: Tuple[int, Optional[torch.Tensor]] = (0, None)

    def _queries(self, C: int) -> torch.Tensor:
        if C == 1:
            return self.q
        if self._wide[0] != C:
            B, H, L, D = self.q.shape
            self._wide = (0, None)  # free the previous copy first
            self._wide = (C, self.q[:, :, None].expand(B, H, C, L, D).reshape(B, H * C, L, D))
        return self._wide[1]

    def evaluate(self, sim: torch.Tensor, sel: torch.Tensor, pv: Optional[torch.Tensor]):
        """sim/sel/pv [H, C] -> (error, density, pv_skip), each [H, C]."""
        H, C = sel.shape
        q = self._queries(C)
        sel_kw = {"cdf_threshold": sel.reshape(-1)} if self.mode == "cdf" else {"topk": sel.reshape(-1)}
        out, st = _fn.attn(q, self.k, self.v, sim_threshold=sim.reshape(-1),
                           pv_threshold=None if pv is None else pv.reshape(-1), enable_gqa=True,
                           auto_dense=False, return_stats=True, **sel_kw, **self.kw)
        B = q.shape[0]
        err = _head_errors(out.view(B, H, C, *out.shape[2:]), self.ref, self.metric)
        dens = st["density"].float().mean(0).view(H, C)
        skip = st["pv_skip_fraction"].float().mean(0).view(H, C)
        return err, dens, skip


def _x_to_sel(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cdf":
        return 1.0 - torch.pow(10.0, -x)
    return x


def _auto_sims(q, k, bq: int, bk: int) -> torch.Tensor:
    """Per-head θ candidates [Hq, 1 + len(_AUTO_SIM_QUANTILES)]: off (-0.1, every
    block selective) and the low quantiles of the head's block self-similarities
    (θ at quantile p makes about a fraction p of the blocks fixed)."""
    from . import reference

    Hq, Hkv = q.shape[1], k.shape[1]
    qsim = reference.block_similarity(q.float(), bq)  # [B, Hq, nq]
    kf = k.float()
    ksim = reference.block_similarity(kf - kf.mean(dim=2, keepdim=True), bk).repeat_interleave(Hq // Hkv, dim=1)
    allsim = torch.cat([qsim, ksim], dim=2).transpose(0, 1).reshape(Hq, -1)  # [Hq, B*(nq+nk)]
    qs = torch.tensor(_AUTO_SIM_QUANTILES, dtype=torch.float32, device=q.device)
    cand = torch.quantile(allsim, qs, dim=1).T  # [Hq, n]
    return torch.cat([torch.full((Hq, 1), -0.1, device=q.device), cand], dim=1).contiguous()


def _search(prob: _Problem, H: int, device, target: float, sim: torch.Tensor, pvs: Sequence[float],
            pv_share: float, steps: int) -> Dict[str, torch.Tensor]:
    C = sim.shape[1]
    mode = prob.mode
    budget = target * (1.0 - pv_share) if pvs else target
    lo = torch.zeros(H, C, device=device)
    hi = torch.full((H, C), _CDF_X_MAX if mode == "cdf" else 1.0, device=device)
    best_sel = torch.ones(H, C, device=device)
    best_dens = torch.ones(H, C, device=device)
    curve_sel, curve_dens, curve_err = [], [], []
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        sel = _x_to_sel(mid, mode).clamp(1e-6, 1.0)
        err, dens, _ = prob.evaluate(sim, sel, None)
        ok = err <= budget
        better = ok & (dens <= best_dens)
        best_sel = torch.where(better, sel, best_sel)
        best_dens = torch.where(better, dens, best_dens)
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
        curve_sel.append(sel)
        curve_dens.append(dens)
        curve_err.append(err)
    # per head, the theta whose best selection computes the fewest blocks
    pick = best_dens.argmin(dim=1, keepdim=True)  # first (lowest theta) on ties
    sim_h = sim.gather(1, pick)  # [H, 1]
    sel_h = best_sel.gather(1, pick)
    pv_h = torch.full((H, 1), math.inf, device=device)
    if pvs:
        P = len(pvs)
        lam = torch.tensor(list(pvs), dtype=torch.float32, device=device)[None].expand(H, P).contiguous()
        err, dens, skip = prob.evaluate(sim_h.expand(H, P).contiguous(), sel_h.expand(H, P).contiguous(), lam)
        ok = err <= target
        # smallest feasible lambda skips the most
        lam_ok = torch.where(ok, lam, torch.full_like(lam, math.inf))
        pv_h = lam_ok.min(dim=1, keepdim=True).values
    # verify the chosen values; a head over the target goes dense
    pv_arg = None if bool(torch.isinf(pv_h).all()) else pv_h
    err, dens, skip = prob.evaluate(sim_h, sel_h, pv_arg)
    bad = err > target
    if bool(bad.any()):
        sel_h = torch.where(bad, torch.ones_like(sel_h), sel_h)
        pv_h = torch.where(bad, torch.full_like(pv_h, math.inf), pv_h)
        pv_arg = None if bool(torch.isinf(pv_h).all()) else pv_h
        err, dens, skip = prob.evaluate(sim_h, sel_h, pv_arg)
    return {
        "sim": sim_h[:, 0], "sel": sel_h[:, 0], "pv": pv_h[:, 0], "error": err[:, 0], "density": dens[:, 0],
        "pv_skip": skip[:, 0], "curve_sim": sim, "curve_sel": torch.stack(curve_sel),
        "curve_density": torch.stack(curve_dens), "curve_error": torch.stack(curve_err),
    }


def _check_options(target, metric, mode, sim_candidates, pv_candidates, pv_share, steps):
    _args.check_number(target, "target", 0.0, math.inf, lo_open=True)
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if isinstance(sim_candidates, str):
        if sim_candidates != "auto":
            raise ValueError(f"sim_candidates: expected 'auto' or a sequence of floats, got {sim_candidates!r}")
        sims = "auto"
    else:
        sims = tuple(sim_candidates)
        if not sims:
            raise ValueError("sim_candidates: needs at least one value")
        for x in sims:
            _args.check_number(x, "sim_candidates")
    pvs = tuple(pv_candidates or ())
    for x in pvs:
        _args.check_number(x, "pv_candidates", 0.0)
    _args.check_number(pv_share, "pv_share", 0.0, 1.0)
    if pv_share >= 1.0 and pvs:
        raise ValueError("pv_share: must be < 1 when pv_candidates are searched")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 30:
        raise ValueError(f"steps: expected an int in [1, 30], got {steps!r}")
    return sims, pvs


def calibrate_layer(query, key, value, attn_mask=None, is_causal: bool = False, scale=None,
                    enable_gqa: bool = False, *, target: float = 0.05, metric: str = "l1", mode: str = "cdf",
                    sim_candidates=DEFAULT_SIM_CANDIDATES,
                    pv_candidates: Optional[Sequence[float]] = DEFAULT_PV_CANDIDATES, pv_share: float = 0.2,
                    steps: int = 8, layout: str = "bhsd", causal_alignment: str = "top_left",
                    precision: str = "auto", reference: Optional[torch.Tensor] = None,
                    key_padding_mask: Optional[torch.Tensor] = None, path: str = "") -> LayerCalibration:
    """Calibrate one attention call (SDPA arguments, plus sparge.attn's
    ``key_padding_mask``) and return the per-head choice with what it achieved.
    ``reference`` is the dense output (computed with torch SDPA when not given)."""
    sims, pvs = _check_options(target, metric, mode, sim_candidates, pv_candidates, pv_share, steps)
    call = _args.resolve_call(query, key, value, layout=layout, enable_gqa=enable_gqa, is_causal=is_causal,
                              causal_alignment=causal_alignment, scale=scale, precision=precision,
                              attn_mask=attn_mask, key_padding_mask=key_padding_mask)
    q, k, v, s, H = call.q, call.k, call.v, call.scale, call.Hq
    if call.mask.kind == _args.OTHER:
        raise ValueError(f"attn_mask: calibration needs a mask sparge runs natively; this one is {call.mask.reason}")
    reason = call.native_reason()
    if reason is not None:
        raise ValueError(f"query: sparge has no kernel for this call ({reason}); nothing to calibrate")
    if reference is None:
        with _suspended():
            reference = _fallback.sdpa(call, attn_mask)[0]
    elif layout == "bshd":
        reference = reference.transpose(1, 2)
    kw = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask, "is_causal": is_causal, "scale": s,
          "causal_alignment": causal_alignment, "precision": precision}
    prob = _Problem(q, k, v, reference, kw, metric, mode)
    with torch.no_grad(), _suspended():
        if sims == "auto":
            bq, bk = call.block_shape()
            sim = _auto_sims(q, k, bq, bk)
        else:
            sim = torch.tensor(sims, dtype=torch.float32, device=q.device)[None].expand(H, len(sims)).contiguous()
        res = _search(prob, H, q.device, target, sim, pvs, pv_share, steps)
    res = {n: t.detach().cpu() for n, t in res.items()}
    return LayerCalibration(path=path, num_heads=H, mode=mode, sim_threshold=res["sim"], selection=res["sel"],
                            pv_threshold=res["pv"], density=res["density"], error=res["error"],
                            pv_skip=res["pv_skip"],
                            curve={"sim": res["curve_sim"], "selection": res["curve_sel"],
                                   "density": res["curve_density"], "error": res["curve_error"]},
                            device_type=q.device.type)


# --------------------------------------------------------------------------
# Capture: attention calls of a running model, by module path
# --------------------------------------------------------------------------
_state = threading.local()


@contextlib.contextmanager
def _suspended():
    """Attention calls made by calibration itself are not captured."""
    prev = getattr(_state, "suspended", False)
    _state.suspended = True
    try:
        yield
    finally:
        _state.suspended = prev


@dataclass
class _Captured:
    """One attention call of the model, as it was made, with its dense output."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: Optional[torch.Tensor]
    dropout_p: float
    is_causal: bool
    scale: Optional[float]
    enable_gqa: bool
    layout: str
    causal_alignment: str
    key_padding_mask: Optional[torch.Tensor]
    out: torch.Tensor  # what the model received

    def dim(self, name: str, tensor: str = "query") -> int:
        """The size of dimension "B", "H", "L" or "D" of query (or key) in the call's layout."""
        i = "BHLD".index(name)
        if self.layout == "bshd" and name in ("H", "L"):
            i = 3 - i
        return getattr(self, tensor).shape[i]


class _Capture:
    """The attention calls of a running model, by module path: SDPA calls of
    this thread through the router ``patch_sdpa`` uses, and ``sparge.attn``
    calls (models already routed to sparge) through its observer."""

    def __init__(self, model, on_call: Callable[[str, _Captured], None]):
        self.model = model
        self.on_call = on_call
        self.stack: List[str] = []
        self.handles = []
        self.counter = 0
        self.ctx = CallContext("<calibrate>", where="sparge.calibrate", capture=self.sdpa)

    def path(self) -> str:
        if self.stack:
            return self.stack[-1]
        self.counter += 1
        return f"attention.{self.counter - 1}"

    def install(self):
        if isinstance(self.model, torch.nn.Module):
            for name, mod in self.model.named_modules():
                if not name:
                    continue
                self.handles.append(mod.register_forward_pre_hook(self._push(name)))
                self.handles.append(mod.register_forward_hook(self._pop, always_call=True))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _push(self, name):
        def hook(mod, args):
            self.stack.append(name)
        return hook

    def _pop(self, mod, args, out):
        if self.stack:
            self.stack.pop()

    def sdpa(self, orig, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra):
        """The router's capture hook: torch's SDPA runs, the call is calibrated on the way."""
        out = orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                   enable_gqa=enable_gqa, **extra)
        if not getattr(_state, "suspended", False):
            self.on_call(self.path(), _Captured(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                enable_gqa, "bhsd", "top_left", None, out))
        return out

    def sparge_attn(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, layout,
                    causal_alignment, key_padding_mask):
        """Observer for sparge.attn calls (models already routed to sparge):
        returns the dense output, calibrating on the way."""
        if getattr(_state, "suspended", False):
            return None
        call = _args.resolve_call(query, key, value, layout=layout, enable_gqa=enable_gqa, is_causal=is_causal,
                                  causal_alignment=causal_alignment, scale=scale,
                                  key_padding_mask=key_padding_mask)
        with _suspended():
            out = call.finish(_fallback.sdpa(call, attn_mask, dropout_p)[0])
        self.on_call(self.path(), _Captured(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                            layout, causal_alignment, key_padding_mask, out))
        return out

    @contextlib.contextmanager
    def running(self):
        """Capture while the body runs; everything is put back on exit, even when it raises."""
        self.install()
        _sdpa.enter(self.ctx)
        prev_observer = _fn._observer
        _fn._observer = self.sparge_attn
        try:
            yield self
        finally:
            _fn._observer = prev_observer
            _sdpa.exit(self.ctx)
            self.remove()


def _merge(records: List[LayerCalibration]) -> LayerConfig:
    """Per head the maximum of each value: each only computes more."""
    sim = torch.stack([r.sim_threshold for r in records]).amax(0)
    sel = torch.stack([r.selection for r in records]).amax(0)
    pv = torch.stack([r.pv_threshold for r in records]).amax(0)
    return _to_layer_config(records[0].mode, sim, sel, pv)


class _Calibration:
    """One ``calibrate`` run. Each captured call goes through the phases in
    order: capture (which calls are calibrated), reference (the dense output
    the search aims at, and the call in the form sparge runs natively),
    candidate search (``calibrate_layer``); after the last input, choose (the
    per-layer config)."""

    def __init__(self, *, target, metric, mode, sims, pvs, pv_share, steps, layers, max_calls_per_layer,
                 min_queries, precision, dense_above, bar):
        self.target, self.metric, self.mode = target, metric, mode
        self.sims, self.pvs, self.pv_share, self.steps = sims, pvs, pv_share, steps
        self.layers, self.max_calls_per_layer, self.min_queries = layers, max_calls_per_layer, min_queries
        self.precision, self.dense_above, self.bar = precision, dense_above, bar
        self.records: List[LayerCalibration] = []
        self.per_layer: Dict[str, int] = {}
        self.skipped: Dict[str, int] = {}

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def on_call(self, path: str, c: _Captured) -> None:
        reason = self.capture_filter(path, c)
        if reason is not None:
            return self.skip(reason)
        try:
            c = self.reference(c)
            rec = self.search(path, c)
        except ValueError as e:
            return self.skip(str(e).split(";")[0])
        self.records.append(rec)
        self.per_layer[path] = self.per_layer.get(path, 0) + 1
        if self.bar is not None:
            self.bar.set_postfix(layers=len(self.per_layer), calls=len(self.records))

    # phase 1: capture ------------------------------------------------------
    def capture_filter(self, path: str, c: _Captured) -> Optional[str]:
        """Why this call is not calibrated, None when it is."""
        if self.layers is not None and not self.layers(path):
            return "filtered out by layers"
        if c.query.dim() != 4 or c.key.dim() != 4:
            return "not 4-D"
        if c.dropout_p and c.dropout_p > 0:
            return "dropout"
        if c.dim("L") < self.min_queries:
            return "fewer than min_queries query rows"
        if self.max_calls_per_layer is not None and self.per_layer.get(path, 0) >= self.max_calls_per_layer:
            return "max_calls_per_layer reached"
        return None

    # phase 2: reference ----------------------------------------------------
    @staticmethod
    def reference(c: _Captured) -> _Captured:
        """The call as sparge runs it, with the output to aim at. A causal LM's
        padded batch (a boolean mask equal to causal pattern AND key padding)
        becomes is_causal + key padding, which sparge runs natively; rows that
        see no key give 0 there, so they are set to 0 in the reference too."""
        if c.attn_mask is None or c.is_causal or c.key_padding_mask is not None:
            return c
        m = _args.classify_mask(c.attn_mask, c.dim("B"), c.dim("H"), c.dim("L"), c.dim("L", "key"), decompose=True)
        if m.kind != _args.CAUSAL_AND_PADDING:
            return c  # natively run, or refused by the search with the mask's reason
        mask = c.attn_mask
        seen = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).any(-1, keepdim=True)
        out = c.out.masked_fill(~(seen if c.layout == "bhsd" else seen.transpose(1, 2)), 0.0)
        return dataclasses.replace(c, attn_mask=None, is_causal=m.causal is not None,
                                   causal_alignment=m.causal or "top_left", key_padding_mask=m.key_padding, out=out)

    # phase 3: candidate search -----------------------------------------------
    def search(self, path: str, c: _Captured) -> LayerCalibration:
        enable_gqa = c.enable_gqa or c.dim("H") != c.dim("H", "key")
        return calibrate_layer(c.query, c.key, c.value, c.attn_mask, c.is_causal, c.scale, enable_gqa,
                               target=self.target, metric=self.metric, mode=self.mode, sim_candidates=self.sims,
                               pv_candidates=self.pvs, pv_share=self.pv_share, steps=self.steps, layout=c.layout,
                               causal_alignment=c.causal_alignment, precision=self.precision, reference=c.out,
                               key_padding_mask=c.key_padding_mask, path=path)

    # phase 4: choose -------------------------------------------------------
    def choose(self) -> SpargeConfig:
        """Per layer, the records merged (or dense above ``dense_above``)."""
        by_path: Dict[str, List[LayerCalibration]] = {}
        for r in self.records:
            by_path.setdefault(r.path, []).append(r)
        for path, recs in by_path.items():
            if len({r.num_heads for r in recs}) > 1:
                raise ValueError(f"model: layer {path!r} was called with different head counts "
                                 f"{sorted({r.num_heads for r in recs})}")
        layer_cfgs = {}
        for p, rs in by_path.items():
            thr = self.dense_above
            if thr == "auto":
                thr = 0.5 if rs[0].device_type == "cuda" else None
            mean_density = sum(r.density.mean().item() for r in rs) / len(rs)
            layer_cfgs[p] = (LayerConfig(topk=1.0, num_heads=rs[0].num_heads)
                             if thr is not None and mean_density > thr else _merge(rs))
        return SpargeConfig(layer_cfgs,
                            metadata={"target": self.target, "metric": self.metric, "mode": self.mode,
                                      "calls": {p: len(rs) for p, rs in by_path.items()}})


def calibrate(model, inputs: Iterable, *, run: Optional[Callable[[Any, Any], Any]] = None, target: float = 0.05,
              metric: str = "l1", mode: str = "cdf", sim_candidates=DEFAULT_SIM_CANDIDATES,
              pv_candidates: Optional[Sequence[float]] = DEFAULT_PV_CANDIDATES, pv_share: float = 0.2,
              steps: int = 8, layers: Optional[Callable[[str], bool]] = None,
              max_calls_per_layer: Optional[int] = None, min_queries: int = 1, precision: str = "auto",
              dense_above="auto", progress: bool = True) -> CalibrationResult:
    """Run ``model`` on each of ``inputs`` and calibrate every attention call.

    ``model``: an ``nn.Module`` (calls are keyed by the path, in
    ``model.named_modules()``, of the innermost module running when attention
    is called — what the integrations look up) or any callable (calls are then
    keyed ``attention.<n>`` in call order). Each input is passed as
    ``run(model, x)`` when ``run`` is given, else ``model(*x)`` for a tuple,
    ``model(**x)`` for a dict, ``model(x)`` otherwise, under ``torch.no_grad()``.
    Attention calls are captured from ``torch.nn.functional.scaled_dot_product_attention``
    (through the router ``sparge.patch_sdpa`` installs, so only the calls of
    the thread running ``calibrate``) and from ``sparge.attn`` (models already
    patched to sparge run dense while calibrating). ``layers`` filters module paths; ``max_calls_per_layer``
    bounds the calls calibrated per layer (e.g. diffusion steps); calls with
    fewer than ``min_queries`` query rows (decode steps) are skipped.
    A layer whose calibrated density (mean over heads and calls) exceeds
    ``dense_above`` is written as dense (``topk=1.0``: exact, and on the GPU
    dispatched to torch's dense kernel, which is faster there); ``"auto"`` is
    0.5 when the calls ran on a GPU and off (None) on the CPU, where the sparse
    kernel is never slower than dense.
    Returns a ``CalibrationResult`` whose ``config`` is the merged ``SpargeConfig``.
    """
    sims, pvs = _check_options(target, metric, mode, sim_candidates, pv_candidates, pv_share, steps)
    if max_calls_per_layer is not None and (not isinstance(max_calls_per_layer, int) or max_calls_per_layer < 1):
        raise ValueError(f"max_calls_per_layer: expected a positive int or None, got {max_calls_per_layer!r}")
    if not (dense_above in ("auto", None) or (isinstance(dense_above, (int, float)) and not isinstance(
            dense_above, bool) and 0.0 <= dense_above <= 1.0)):
        raise ValueError(f"dense_above: expected 'auto', None or a density in [0, 1], got {dense_above!r}")
    if not callable(model):
        raise TypeError(f"model: expected an nn.Module or a callable, got {type(model).__name__}")
    bar = _progress(inputs, progress)
    cal = _Calibration(target=target, metric=metric, mode=mode, sims=sims, pvs=pvs, pv_share=pv_share, steps=steps,
                       layers=layers, max_calls_per_layer=max_calls_per_layer, min_queries=min_queries,
                       precision=precision, dense_above=dense_above, bar=bar)
    cap = _Capture(model, cal.on_call)
    try:
        with cap.running(), torch.no_grad():
            for x in (bar if bar is not None else inputs):
                cap.counter = 0  # a callable's calls are keyed by their order within one input
                if run is not None:
                    run(model, x)
                elif isinstance(x, tuple):
                    model(*x)
                elif isinstance(x, dict):
                    model(**x)
                else:
                    model(x)
    finally:
        if bar is not None:
            bar.close()
    config = cal.choose()
    if cal.skipped:
        log.info("sparge.calibrate: calls not calibrated: %s", cal.skipped)
    return CalibrationResult(config=config, records=cal.records, target=target, metric=metric, mode=mode,
                             skipped=cal.skipped)


def _progress(inputs, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    total = len(inputs) if hasattr(inputs, "__len__") else None
    return tqdm(inputs, total=total, desc="sparge calibrate", unit="input", leave=False)
