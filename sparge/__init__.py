"""sparge: training-free block-sparse attention for PyTorch (the SpargeAttn method).

    import sparge
    out = sparge.attn(q, k, v, is_causal=True, topk=0.25)   # drop-in for F.scaled_dot_product_attention

See README.md and docs/spec.md for the method and the contract.
"""
from . import hilbert as hilbert  # sparge.hilbert: Hilbert token order (SPEC §4)
from ._fallback import fallback_counts, reset_fallback_counts
from ._lib import NotSupportedError, SpargeError
from .calibration import CalibrationResult, calibrate, calibrate_layer
from .config import ConfigError, LayerConfig, SpargeConfig
from .functional import attn, block_shape, block_sparse_attn, predict
from .integrations.sdpa import patch_sdpa

__version__ = "0.1.0"

__all__ = [
    "attn",
    "predict",
    "block_sparse_attn",
    "block_shape",
    "fallback_counts",
    "reset_fallback_counts",
    "SpargeError",
    "NotSupportedError",
    "LayerConfig",
    "SpargeConfig",
    "ConfigError",
    "calibrate",
    "calibrate_layer",
    "CalibrationResult",
    "patch_sdpa",
    "cuda_available",
]


def cuda_available() -> bool:
    """True when this build has the CUDA backend and a supported GPU is present."""
    import torch

    from . import _lib

    return (_lib.cuda_compiled() and torch.cuda.is_available()
            and _lib.device_reason("cuda", torch.cuda.current_device()) is None)
