"""Source dtypes, how they are stored, and how they widen for fitting.

Zarr has no bfloat16 or float8, so those are stored as their exact bit patterns
(uint16 / uint8) and the source dtype is kept in the array attributes.
"""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DType:
    name: str  # canonical name, as torch spells it without the prefix: "bfloat16"
    torch: torch.dtype
    storage: np.dtype  # what the Zarr array holds
    is_float: bool  # float tensors are forecast; everything else is copied


def _table() -> dict[str, DType]:
    rows = [
        ("float64", torch.float64, np.float64, True),
        ("float32", torch.float32, np.float32, True),
        ("float16", torch.float16, np.float16, True),
        ("bfloat16", torch.bfloat16, np.uint16, True),
        ("int64", torch.int64, np.int64, False),
        ("int32", torch.int32, np.int32, False),
        ("int16", torch.int16, np.int16, False),
        ("int8", torch.int8, np.int8, False),
        ("uint8", torch.uint8, np.uint8, False),
        ("bool", torch.bool, np.bool_, False),
    ]
    for fp8 in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, fp8):  # fp8 exists only in newer torch builds
            rows.append((fp8, getattr(torch, fp8), np.uint8, True))
    return {n: DType(n, t, np.dtype(s), f) for n, t, s, f in rows}


DTYPES: dict[str, DType] = _table()
_BY_TORCH = {d.torch: d for d in DTYPES.values()}

# safetensors header spelling -> canonical name
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def dtype_of(t: torch.dtype) -> DType:
    """The DType row of a torch dtype; an unsupported dtype raises KeyError."""
    return _BY_TORCH[t]


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A tensor's exact values as the numpy array the store holds (bit patterns for bf16/fp8)."""
    d = dtype_of(t.dtype)
    t = t.detach().cpu().contiguous()
    if d.storage.kind == "u" and d.is_float:  # bf16 / fp8: reinterpret bits
        bits = torch.int16 if d.storage.itemsize == 2 else torch.int8
        return t.view(bits).numpy().view(d.storage)
    return t.numpy()


def from_storage(a: np.ndarray, name: str) -> torch.Tensor:
    """Inverse of ``to_storage``: the exact source-dtype tensor for stored values."""
    d = DTYPES[name]
    a = np.ascontiguousarray(a)
    if d.storage.kind == "u" and d.is_float:
        bits = np.int16 if d.storage.itemsize == 2 else np.int8
        return torch.from_numpy(a.view(bits)).view(d.torch)
    return torch.from_numpy(a)


def widen(a: np.ndarray, name: str) -> torch.Tensor:
    """Stored values of a float tensor as exact float32 (float64 stays float64)."""
    t = from_storage(a, name)
    return t if t.dtype == torch.float64 else t.to(torch.float32)
