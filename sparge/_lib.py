"""Loads the compiled module ``sparge._C`` once and turns C status codes into
Python exceptions. Everything that talks to the C ABI goes through here."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional, Tuple

import torch


def _load_extension():
    """Imports sparge._C with its OpenMP runtime set to sleep, not spin, when idle.

    torch ships its own OpenMP runtime; the C backend links the system one. Two
    runtimes whose idle threads spin fight over the cores (a tiny attention call
    went from 0.3 ms to 28 ms on 2 cores). libgomp reads OMP_WAIT_POLICY once,
    when it is loaded, so the variable is set only around the import and then
    restored: torch's runtime and child processes keep the user's setting."""
    had = "OMP_WAIT_POLICY" in os.environ
    old = os.environ.get("OMP_WAIT_POLICY")
    if not had:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from . import _C as ext
    finally:
        if not had:
            os.environ.pop("OMP_WAIT_POLICY", None)
        elif old is not None:
            os.environ["OMP_WAIT_POLICY"] = old
    return ext


_C = _load_extension()

ABI_VERSION = 1
if _C.abi_version() != ABI_VERSION:  # a stale build next to newer Python files
    raise ImportError(
        f"sparge._C has ABI version {_C.abi_version()}, this sparge package expects {ABI_VERSION}: "
        "rebuild with `pip install .`"
    )

# sparge_status_t
SUCCESS = 0
INVALID_VALUE = 1
NOT_SUPPORTED = 2
MISALIGNED = 3
CUDA_ERROR = 4
INTERNAL = 5
OUT_OF_MEMORY = 6
WORKSPACE_TOO_SMALL = 7

# sparge_dtype_t
_DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.bool: 3,
    torch.uint8: 4,
    torch.int32: 5,
    torch.int64: 6,
}
DEVICE_CPU, DEVICE_CUDA = 1, 2

# sparge_causal_t / sparge_select_t / sparge_precision_t
CAUSAL_CODES = {None: 0, "top_left": 1, "bottom_right": 2}
SELECT_TOPK, SELECT_CDF = 0, 1
PRECISION_CODES = {"auto": 0, "fp16": 1, "bf16": 2, "int8": 3}
PRECISION_NAMES = {v: k for k, v in PRECISION_CODES.items()}


class SpargeError(RuntimeError):
    """A failure inside the C library (CUDA error, internal error, out of memory)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NotSupportedError(SpargeError):
    """Valid input that this build or device has no kernel for."""


def check(status: int, what: str) -> None:
    """Raise the Python exception matching a C status (ValueError for bad input)."""
    if status == SUCCESS:
        return
    detail = _C.last_error()
    message = f"{what}: {detail}" if detail else f"{what}: {_C.status_string(status)}"
    if status == INVALID_VALUE or status == MISALIGNED:
        raise ValueError(message)
    if status == NOT_SUPPORTED:
        raise NotSupportedError(status, message)
    raise SpargeError(status, f"{message} ({_C.status_string(status)})")


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by sparge") from None


def device_codes(device: torch.device) -> Tuple[int, int]:
    if device.type == "cpu":
        return DEVICE_CPU, 0
    if device.type == "cuda":
        return DEVICE_CUDA, device.index if device.index is not None else torch.cuda.current_device()
    return 0, 0  # the C layer answers NOT_SUPPORTED


def desc(t: Optional[torch.Tensor]):
    """The tuple form of a sparge_tensor_t for the bindings (None stays None)."""
    if t is None:
        return None
    dev_type, dev_id = device_codes(t.device)
    return (t.data_ptr(), dtype_code(t.dtype), dev_type, dev_id, tuple(t.shape), tuple(t.stride()))


def stream_handle(device: torch.device) -> int:
    """The current CUDA stream of a device as an integer (0 for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return 0


@torch.compiler.assume_constant_result
def _capability(index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def device_capability(device: torch.device) -> Tuple[int, int]:
    return _capability(device_codes(device)[1])


@functools.lru_cache(maxsize=None)
def cuda_compiled() -> bool:
    return bool(_C.cuda_compiled())


# The two queries below are constant per process; torch.compile calls them at
# trace time and keeps the answer (assume_constant_result), so no graph breaks.
@functools.lru_cache(maxsize=None)
def _device_reason_cached(device_type: str, device_index: int) -> str:
    dev_type, dev_id = device_codes(torch.device(device_type, device_index))
    status = _C.device_supported(dev_type, device_id=dev_id)
    return "" if status == SUCCESS else (_C.last_error() or _C.status_string(status))


@torch.compiler.assume_constant_result
def _device_reason_const(device_type: str, device_index: int) -> str:
    return _device_reason_cached(device_type, device_index)


def device_reason(device_type: str, device_index: int) -> Optional[str]:
    """None when sparge kernels run on this device, else why not."""
    return _device_reason_const(device_type, device_index) or None


@functools.lru_cache(maxsize=None)
def _block_shape_cached(dev_type: int, dev_id: int, head_dim: int, head_dim_v: int, dtype: int, precision: int):
    status, bq, bk, group, prec = _C.block_shape(dev_type, dev_id, head_dim=head_dim, head_dim_v=head_dim_v,
                                                 dtype=dtype, precision=precision)
    return status, (_C.last_error() if status else ""), (bq, bk, group, prec)


@torch.compiler.assume_constant_result
def _block_shape_const(dev_type: int, dev_id: int, head_dim: int, head_dim_v: int, dtype: int, precision: int):
    return _block_shape_cached(dev_type, dev_id, head_dim, head_dim_v, dtype, precision)


def kernel_config(device: torch.device, head_dim: int, head_dim_v: int, dtype: torch.dtype,
                  precision: str) -> Tuple[int, int, int, int]:
    """(block_q, block_k, pv_group, precision code) for this device; raises
    NotSupportedError when there is no kernel, ValueError for nonsense."""
    dev_type, dev_id = device_codes(device)
    status, message, shape = _block_shape_const(dev_type, dev_id, int(head_dim), int(head_dim_v),
                                                dtype_code(dtype), PRECISION_CODES[precision])
    if status == SUCCESS:
        return shape
    if status == NOT_SUPPORTED:
        raise NotSupportedError(status, message)
    raise ValueError(f"block_shape: {message}")


def device_guard(device: torch.device):
    """Makes device current for the C calls (CUDA), a no-op for the CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def workspace(nbytes: int, device: torch.device) -> Tuple[Optional[torch.Tensor], int]:
    """A 256-byte aligned workspace from torch's allocator: (holder, address)."""
    if nbytes == 0:
        return None, 0
    holder = torch.empty(nbytes + 256, dtype=torch.uint8, device=device)
    address = (holder.data_ptr() + 255) & ~255
    return holder, address
