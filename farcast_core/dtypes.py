"""Source dtypes, how they are stored, and how they widen for fitting.

Zarr has no bfloat16 or float8, so those are stored as their exact bit patterns
(uint16 / uint8) and the source dtype is kept in the array attributes.
"""

from dataclasses import dataclass

import numpy as np

# torch is imported where a tensor is made, not here: ingesting safetensors files needs only
# numpy, and `import torch` alone costs ~2 s on a small machine.


@dataclass(frozen=True)
class DType:
    name: str  # canonical name, as torch spells it without the prefix: "bfloat16"
    storage: np.dtype  # what the Zarr array holds
    is_float: bool  # float tensors are forecast; everything else is copied

    @property
    def torch(self):
        import torch

        return getattr(torch, self.name)


DTYPES: dict[str, DType] = {
    n: DType(n, np.dtype(s), f)
    for n, s, f in [
        ("float64", np.float64, True),
        ("float32", np.float32, True),
        ("float16", np.float16, True),
        ("bfloat16", np.uint16, True),  # bit patterns: zarr has no bfloat16
        ("float8_e4m3fn", np.uint8, True),
        ("float8_e5m2", np.uint8, True),
        ("int64", np.int64, False),
        ("int32", np.int32, False),
        ("int16", np.int16, False),
        ("int8", np.int8, False),
        ("uint8", np.uint8, False),
        ("bool", np.bool_, False),
    ]
}

# safetensors header spelling -> canonical name
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}

# values whose bits under this mask are all ones are NaN or Inf, per bit-stored dtype
_NONFINITE_MASK = {"bfloat16": 0x7F80, "float8_e4m3fn": 0x7F, "float8_e5m2": 0x7C}


def dtype_of(t) -> DType:
    """The DType row of a torch dtype; an unsupported dtype raises KeyError."""
    return DTYPES[str(t).removeprefix("torch.")]


def nonfinite(values: np.ndarray, name: str) -> bool:
    """Whether stored values of a float tensor hold NaN or Inf (from the bits for bf16/fp8)."""
    mask = _NONFINITE_MASK.get(name)
    if mask is None:
        return not bool(np.isfinite(values).all())
    return bool(((values & mask) == mask).any())


def to_storage(t) -> np.ndarray:
    """A tensor's exact values as the numpy array the store holds (bit patterns for bf16/fp8)."""
    import torch

    d = dtype_of(t.dtype)
    t = t.detach().cpu().contiguous()
    if d.storage.kind == "u" and d.is_float:  # bf16 / fp8: reinterpret bits
        bits = torch.int16 if d.storage.itemsize == 2 else torch.int8
        return t.view(bits).numpy().view(d.storage)
    return t.numpy()


def from_storage(a: np.ndarray, name: str):
    """Inverse of ``to_storage``: the exact source-dtype tensor for stored values."""
    import torch

    d = DTYPES[name]
    a = np.ascontiguousarray(a)
    if d.storage.kind == "u" and d.is_float:
        bits = np.int16 if d.storage.itemsize == 2 else np.int8
        return torch.from_numpy(a.view(bits)).view(d.torch)
    return torch.from_numpy(a)


def widen(a: np.ndarray, name: str):
    """Stored values of a float tensor as exact float32 (float64 stays float64)."""
    import torch

    t = from_storage(a, name)
    return t if t.dtype == torch.float64 else t.to(torch.float32)


def widen_np(a: np.ndarray, name: str) -> np.ndarray:
    """``widen`` in numpy: exact float32 (float64 stays float64), without importing torch for bf16."""
    if name == "float64":
        return np.asarray(a, dtype=np.float64)
    if name == "bfloat16":  # the top 16 bits of a float32
        return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if name.startswith("float8"):
        return widen(a, name).numpy()
    return np.asarray(a, dtype=np.float32)
