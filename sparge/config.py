"""Per-layer, per-head hyperparameters: ``LayerConfig`` and ``SpargeConfig``.

A ``LayerConfig`` holds one attention layer's hyperparameters, each a float
(all heads) or a list with one value per query head:

- ``sim_threshold`` (θ): k-/q-blocks whose self-similarity is not above θ are
  always computed;
- exactly one of ``topk`` (ρ ∈ (0, 1]) and ``cdf_threshold`` (τ ∈ (0, 1]);
- ``pv_threshold`` (λ ≥ 0, log2 units), ``None`` for off; in a per-head list
  ``None`` turns PV skip off for that head.

A ``SpargeConfig`` maps exact module paths (names from
``model.named_modules()`` of the module that owns the attention call, e.g.
``model.layers.0.self_attn`` or ``transformer_blocks.3.attn1``) to
``LayerConfig``s, with an optional ``default`` for every other layer. It is
stored as JSON with a schema version (never pickle); ``load`` validates types,
ranges and head counts and raises ``ConfigError`` (a ``ValueError``) naming
the offending entry.

    cfg = SpargeConfig({"blocks.0.attn": LayerConfig(sim_threshold=[0.3, 0.5], cdf_threshold=[0.9, 0.95])})
    cfg.save("model.sparge.json")
    cfg = SpargeConfig.load("model.sparge.json", num_heads={"blocks.0.attn": 2})
    out = sparge.attn(q, k, v, config=cfg.layer("blocks.0.attn"))
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = ["LayerConfig", "SpargeConfig", "ConfigError", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
_FORMAT = "sparge.SpargeConfig"
_FIELDS = ("sim_threshold", "topk", "cdf_threshold", "pv_threshold")

Value = Union[float, Sequence[Optional[float]]]


class ConfigError(ValueError):
    """A malformed, out-of-range or mismatched configuration."""


def _number(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ConfigError(f"{where}: expected a number, got {type(x).__name__} {x!r}")
    return float(x)


def _check_range(x: float, name: str, where: str) -> None:
    if math.isnan(x) or math.isinf(x):
        raise ConfigError(f"{where}: {name} value {x} is not finite")
    if name in ("topk", "cdf_threshold") and not 0.0 < x <= 1.0:
        raise ConfigError(f"{where}: {name} value {x} is outside (0, 1]")
    if name == "pv_threshold" and x < 0.0:
        raise ConfigError(f"{where}: pv_threshold value {x} is negative")


def _normalize(value, name: str, where: str) -> Union[None, float, Tuple[Optional[float], ...]]:
    """A float, a tuple of per-head floats (None allowed for pv_threshold), or None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ConfigError(f"{where}: {name} tensor must be 0-D or 1-D, got shape {tuple(value.shape)}")
        value = value.item() if value.dim() == 0 else value.detach().cpu().double().tolist()
        if name == "pv_threshold" and isinstance(value, list):
            value = [None if math.isinf(x) and x > 0 else x for x in value]
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ConfigError(f"{where}: {name} is an empty list")
        out = []
        for i, x in enumerate(value):
            if x is None:
                if name != "pv_threshold":
                    raise ConfigError(f"{where}: {name}[{i}] is null (only pv_threshold may be null per head)")
                out.append(None)
                continue
            x = _number(x, f"{where}: {name}[{i}]")
            _check_range(x, name, f"{where}: head {i}")
            out.append(x)
        return tuple(out)
    x = _number(value, f"{where}: {name}")
    _check_range(x, name, where)
    return x


class LayerConfig:
    """One attention layer's hyperparameters (floats or per-head lists); immutable.

    ``sparge.attn(..., config=layer_config)`` uses them in place of the
    keyword arguments."""

    __slots__ = ("sim_threshold", "topk", "cdf_threshold", "pv_threshold", "num_heads", "_tensors")

    def __init__(self, sim_threshold: Value = -0.1, topk: Optional[Value] = None,
                 cdf_threshold: Optional[Value] = None, pv_threshold: Optional[Value] = None,
                 num_heads: Optional[int] = None, *, _where: str = "LayerConfig"):
        vals = {}
        for name, value in zip(_FIELDS, (sim_threshold, topk, cdf_threshold, pv_threshold)):
            vals[name] = _normalize(value, name, _where)
        if vals["sim_threshold"] is None:
            raise ConfigError(f"{_where}: sim_threshold is required")
        if vals["topk"] is not None and vals["cdf_threshold"] is not None:
            raise ConfigError(f"{_where}: give either topk or cdf_threshold, not both")
        lengths = {name: len(v) for name, v in vals.items() if isinstance(v, tuple)}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"{_where}: per-head lists differ in length: {lengths}")
        heads = next(iter(lengths.values()), None)
        if num_heads is not None:
            if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
                raise ConfigError(f"{_where}: num_heads must be a positive int, got {num_heads!r}")
            if heads is not None and heads != num_heads:
                raise ConfigError(f"{_where}: num_heads is {num_heads} but the per-head lists have {heads} values")
            heads = num_heads
        for name, v in vals.items():
            object.__setattr__(self, name, v)
        object.__setattr__(self, "num_heads", heads)
        object.__setattr__(self, "_tensors", {})

    def __setattr__(self, name, value):
        raise AttributeError("LayerConfig is immutable; build a new one")

    @property
    def selection(self) -> str:
        """'cdf' or 'topk' (topk=0.5, the API default, when neither is set)."""
        return "cdf" if self.cdf_threshold is not None else "topk"

    def check_heads(self, num_heads: int, where: str = "config") -> None:
        if self.num_heads is not None and self.num_heads != num_heads:
            raise ConfigError(f"{where}: has {self.num_heads} heads but the attention call has {num_heads} "
                              "query heads")

    def attn_kwargs(self, num_heads: int, device: torch.device) -> Dict[str, Any]:
        """Keyword arguments for ``sparge.attn`` (per-head values as float32
        tensors on ``device``, cached); raises ConfigError on a head mismatch."""
        self.check_heads(num_heads)
        key = (torch.device(device), num_heads)
        cached = None if torch.compiler.is_compiling() else self._tensors.get(key)
        if cached is not None:
            return dict(cached)
        kw: Dict[str, Any] = {}
        for name in _FIELDS:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, tuple) and len(set(v)) == 1 and v[0] is not None:
                v = v[0]  # one value for every head: a float (cached constants, dense-dispatch policy)
            elif isinstance(v, tuple):
                if all(x is None for x in v):
                    continue  # PV skip off for every head
                v = torch.tensor([math.inf if x is None else x for x in v], dtype=torch.float32, device=device)
            kw[name] = v
        if not torch.compiler.is_compiling():
            self._tensors[key] = kw
        return dict(kw)

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {}
        if self.num_heads is not None:
            d["num_heads"] = self.num_heads
        for name in _FIELDS:
            v = getattr(self, name)
            if v is not None or name == "pv_threshold":
                d[name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "LayerConfig") -> "LayerConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
        unknown = set(d) - set(_FIELDS) - {"num_heads"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (allowed: num_heads, {', '.join(_FIELDS)})")
        return cls(**{k: d[k] for k in d}, _where=where)

    def __eq__(self, other) -> bool:
        return isinstance(other, LayerConfig) and self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __repr__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.to_dict().items()]
        return f"LayerConfig({', '.join(parts)})"


class SpargeConfig:
    """Hyperparameters per attention layer, keyed by exact module path."""

    def __init__(self, layers: Optional[Mapping[str, Union[LayerConfig, Mapping[str, Any]]]] = None,
                 default: Optional[Union[LayerConfig, Mapping[str, Any]]] = None,
                 metadata: Optional[Mapping[str, Any]] = None):
        self._layers: Dict[str, LayerConfig] = {}
        for path, lc in (layers or {}).items():
            if not isinstance(path, str) or not path:
                raise ConfigError(f"layers: keys must be non-empty module paths, got {path!r}")
            self._layers[path] = lc if isinstance(lc, LayerConfig) else LayerConfig.from_dict(lc, f"layers[{path!r}]")
        if default is not None and not isinstance(default, LayerConfig):
            default = LayerConfig.from_dict(default, "default")
        self.default: Optional[LayerConfig] = default
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ConfigError(f"metadata: expected an object, got {type(metadata).__name__}")
        self.metadata: Dict[str, Any] = dict(metadata or {})

    # -- lookup -------------------------------------------------------------
    def layer(self, path: str) -> Optional[LayerConfig]:
        """The layer's config: its own entry, else the default, else None."""
        return self._layers.get(path, self.default)

    def __getitem__(self, path: str) -> LayerConfig:
        return self._layers[path]

    def __setitem__(self, path: str, lc: LayerConfig) -> None:
        if not isinstance(lc, LayerConfig):
            raise TypeError(f"SpargeConfig[{path!r}]: expected a LayerConfig, got {type(lc).__name__}")
        self._layers[path] = lc

    def __contains__(self, path) -> bool:
        return path in self._layers

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def items(self):
        return self._layers.items()

    def single(self) -> LayerConfig:
        """The one LayerConfig of a config with only a default or only one layer
        (what ``sparge.attn(config=SpargeConfig)`` uses)."""
        if not self._layers and self.default is not None:
            return self.default
        if len(self._layers) == 1 and self.default is None:
            return next(iter(self._layers.values()))
        raise ConfigError(f"config: this SpargeConfig has {len(self._layers)} layers"
                          f"{' and a default' if self.default is not None else ''}; pass config.layer(module_path) "
                          "for one attention call")

    def check_heads(self, num_heads: Mapping[str, int]) -> None:
        """Raise ConfigError when a layer's head count differs from ``num_heads[path]``
        or a path in the config is not among ``num_heads``' keys."""
        missing = [p for p in self._layers if p not in num_heads]
        if missing:
            raise ConfigError(f"config: layers {missing[:5]} are not attention modules of this model "
                              f"(known: {list(num_heads)[:5]}...)")
        for path, lc in self._layers.items():
            lc.check_heads(num_heads[path], where=f"layers[{path!r}]")

    # -- (de)serialization --------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": _FORMAT,
            "schema_version": SCHEMA_VERSION,
            "metadata": self.metadata,
            "default": None if self.default is None else self.default.to_dict(),
            "layers": {p: lc.to_dict() for p, lc in self._layers.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SpargeConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"config: expected a JSON object at the top level, got {type(d).__name__}")
        if d.get("format") != _FORMAT:
            raise ConfigError(f"config: 'format' is {d.get('format')!r}, expected {_FORMAT!r}")
        version = d.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ConfigError(f"config: 'schema_version' must be an int, got {version!r}")
        if version > SCHEMA_VERSION or version < 1:
            raise ConfigError(f"config: schema_version {version} is not supported by this sparge "
                              f"(supports 1..{SCHEMA_VERSION}); upgrade sparge")
        unknown = set(d) - {"format", "schema_version", "metadata", "default", "layers"}
        if unknown:
            raise ConfigError(f"config: unknown top-level keys {sorted(unknown)}")
        layers = d.get("layers", {})
        if not isinstance(layers, Mapping):
            raise ConfigError(f"config: 'layers' must be an object, got {type(layers).__name__}")
        return cls(layers, d.get("default"), d.get("metadata"))

    def save(self, path: Union[str, os.PathLike]) -> None:
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], num_heads: Optional[Mapping[str, int]] = None) -> "SpargeConfig":
        """Read and validate a config file; with ``num_heads`` ({module path:
        query heads}), also check that it matches the model."""
        name = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ConfigError(f"{name}: not a UTF-8 text file, so not a sparge config ({e.reason} at byte "
                              f"{e.start})") from None

        def no_constant(name):
            raise ConfigError(f"{os.fspath(path)}: {name} is not valid JSON (non-finite numbers are not allowed)")

        try:
            raw = json.loads(text, parse_constant=no_constant)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}: not valid JSON ({e})") from None
        except RecursionError:
            raise ConfigError(f"{name}: JSON nested too deeply to be a sparge config") from None
        try:
            cfg = cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{os.fspath(path)}: {e}") from None
        if num_heads is not None:
            cfg.check_heads(num_heads)
        return cfg

    def __eq__(self, other) -> bool:
        return isinstance(other, SpargeConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"SpargeConfig({len(self._layers)} layers, default={self.default!r})"


def resolve(config, num_heads: int, device: torch.device) -> Dict[str, Any]:
    """``sparge.attn``'s view of its ``config`` argument: keyword overrides."""
    if isinstance(config, SpargeConfig):
        config = config.single()
    if isinstance(config, LayerConfig):
        return config.attn_kwargs(num_heads, device)
    if isinstance(config, Mapping):
        unknown = set(config) - set(_FIELDS)
        if unknown:
            raise ValueError(f"config: unknown keys {sorted(unknown)} (allowed: {', '.join(_FIELDS)})")
        if config.get("topk") is not None and config.get("cdf_threshold") is not None:
            raise ConfigError("config: give either topk or cdf_threshold, not both")
        return dict(config)
    raise TypeError(f"config: expected a LayerConfig, SpargeConfig or dict, got {type(config).__name__}")
