"""Loads the compiled module ``sparge._C`` once and turns C status codes into
Python exceptions. Everything that talks to the C ABI goes through here."""
from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from typing import List, Optional, Tuple

import torch

ABI_VERSION = 1

_PACKAGE = __name__.rpartition(".")[0]  # "sparge"
_SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
_BUILD_HINT = ("run `pip install .` in the sparge checkout (then run Python from any folder, its root included), "
               "or build next to the sources: `python setup.py build_ext --inplace`")


def _same_dir(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _extension_names() -> List[str]:
    return ["_C" + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES]


def _installed_extension() -> Tuple[Optional[str], Optional[importlib.metadata.Distribution]]:
    """(path, distribution) of the compiled ``sparge._C`` of a sparge installed
    somewhere other than this source folder, else (None, None).

    This is the case of a checkout whose root is the working directory after
    ``pip install .``: its ``sparge/`` folder comes first on ``sys.path`` and
    shadows the installed package, but has no compiled module of its own.
    First the installed distributions' file lists (what pip recorded), then
    a ``sparge/_C*`` beside any other ``sys.path`` entry (an install without
    a record)."""
    names = set(_extension_names())
    for dist in importlib.metadata.distributions(name=_PACKAGE):
        for f in dist.files or ():
            if len(f.parts) == 2 and f.parts[0] == _PACKAGE and f.parts[1] in names:
                path = str(dist.locate_file(f))
                if os.path.isfile(path) and not _same_dir(os.path.dirname(path), _SOURCE_DIR):
                    return os.path.abspath(path), dist
    for entry in sys.path:
        folder = os.path.join(entry or os.getcwd(), _PACKAGE)
        if _same_dir(folder, _SOURCE_DIR):
            continue
        for name in _extension_names():
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return os.path.abspath(path), None
    return None, None


def _record_hash(path: str) -> str:
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _differing_sources(dist: importlib.metadata.Distribution) -> List[str]:
    """The Python files of this source folder that differ from (or are missing
    in) the installed distribution, by the sha256 hashes pip recorded."""
    installed = {}
    for f in dist.files or ():
        if f.parts and f.parts[0] == _PACKAGE and f.name.endswith(".py") and f.hash is not None \
                and f.hash.mode == "sha256":
            installed["/".join(f.parts[1:])] = f.hash.value
    here = {}
    for root, dirs, files in os.walk(_SOURCE_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                here[os.path.relpath(path, _SOURCE_DIR).replace(os.sep, "/")] = path
    differ = sorted(set(installed) ^ set(here))
    differ += [rel for rel in sorted(set(installed) & set(here)) if _record_hash(here[rel]) != installed[rel]]
    return sorted(differ)


def _import_extension():
    """(module, where): ``sparge._C`` next to these Python files when it is there
    (in-place build, editable or regular install), else the installed one,
    loaded by its file location under the same name."""
    if importlib.util.find_spec(_PACKAGE + "._C") is not None:
        from . import _C as ext

        return ext, "beside the package's Python files"
    path, dist = _installed_extension()
    if path is None:
        raise ImportError(f"sparge's compiled module sparge._C is not built (none in {_SOURCE_DIR}, "
                          f"no installed sparge): {_BUILD_HINT}", name=_PACKAGE)
    spec = importlib.util.spec_from_file_location(_PACKAGE + "._C", path)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    sys.modules[spec.name] = ext
    sys.modules[_PACKAGE]._C = ext  # as `from . import _C` leaves it
    if dist is not None:
        differ = _differing_sources(dist)
        if differ:
            listed = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
            warnings.warn(f"sparge: the Python files in {_SOURCE_DIR} differ from the installed sparge ({listed}) "
                          f"whose compiled module they use ({path}); if anything fails, reinstall from this "
                          "checkout (`pip install .`) or build in place (`python setup.py build_ext --inplace`)",
                          stacklevel=2)
    return ext, "the installed sparge's, loaded by path"


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
        return _import_extension()
    finally:
        if not had:
            os.environ.pop("OMP_WAIT_POLICY", None)
        elif old is not None:
            os.environ["OMP_WAIT_POLICY"] = old


_C, EXTENSION_ORIGIN = _load_extension()
EXTENSION_PATH = os.path.abspath(_C.__file__)

# A stale build: a compiled module older (or newer) than these Python files,
# whether built in place or taken from an installed sparge. Within one ABI
# version the Python files and the module work together.
if _C.abi_version() != ABI_VERSION:
    raise ImportError(
        f"sparge._C ({EXTENSION_PATH}, {EXTENSION_ORIGIN}) has ABI version {_C.abi_version()}, the sparge "
        f"Python files in {_SOURCE_DIR} expect {ABI_VERSION}: the build is stale; rebuild it from these "
        f"sources: {_BUILD_HINT}", name=_PACKAGE)

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
