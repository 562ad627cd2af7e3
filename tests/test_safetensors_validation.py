"""farcast accepts a safetensors file exactly when the safetensors library does (property test)."""

import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from farcast_core.errors import CheckpointError
from farcast.storage.layouts.safetensors_files import read_safetensors_header

DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}


def _file(tensors: list[tuple[str, str, list[int]]]) -> tuple[dict, bytes]:
    """A valid header and data section for (name, dtype, shape) in file order."""
    header, pos = {}, 0
    for name, dtype, shape in tensors:
        n = DTYPES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header, bytes(range(256)) * (pos // 256) + bytes(range(pos % 256))


def _write(path: Path, header: dict, data: bytes, pad: int = 0, length_delta: int = 0) -> None:
    raw = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data)


def _library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            list(f.keys())
        return True
    except Exception:
        return False


def _farcast_accepts(path: Path) -> bool:
    try:
        read_safetensors_header(path)
        return True
    except CheckpointError:
        return False


tensor = st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 5), min_size=0, max_size=3))
mutation = st.one_of(
    st.tuples(st.just("offset"), st.integers(0, 3), st.integers(0, 1), st.integers(-40, 40)),
    st.tuples(st.just("swap"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("shape"), st.integers(0, 3), st.integers(0, 2), st.integers(-1, 6)),
    st.tuples(st.just("dtype"), st.integers(0, 3), st.sampled_from(sorted(DTYPES))),
    st.tuples(st.just("data"), st.integers(-9, 9)),
    st.tuples(st.just("length"), st.integers(-3, 3)),
    st.tuples(st.just("negative"), st.integers(0, 3)),
    st.tuples(st.just("same"), st.integers(0, 3), st.integers(0, 3)),
)


def _mutate(header: dict, data: bytes, m) -> tuple[dict, bytes, int]:
    names = [k for k in header if k != "__metadata__"]
    kind, *args = m
    length_delta = 0
    if kind == "offset":
        h = header[names[args[0] % len(names)]]
        h["data_offsets"][args[1]] += args[2]
    elif kind == "swap":
        a, b = header[names[args[0] % len(names)]], header[names[args[1] % len(names)]]
        a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
    elif kind == "shape":
        h = header[names[args[0] % len(names)]]
        if h["shape"]:
            h["shape"][args[1] % len(h["shape"])] = args[2]
        else:
            h["shape"] = [args[2]]
    elif kind == "dtype":
        header[names[args[0] % len(names)]]["dtype"] = args[1]
    elif kind == "data":
        data = data + bytes(args[0]) if args[0] >= 0 else data[: len(data) + args[0]]
    elif kind == "length":
        length_delta = args[0]
    elif kind == "negative":
        h = header[names[args[0] % len(names)]]
        h["data_offsets"] = [-abs(h["data_offsets"][0]) - 8, h["data_offsets"][1]]
    elif kind == "same":  # two tensors share one span: overlapping data
        a, b = header[names[args[0] % len(names)]], header[names[args[1] % len(names)]]
        b["data_offsets"] = list(a["data_offsets"])
    return header, data, length_delta


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.lists(tensor, min_size=1, max_size=4), mutations=st.lists(mutation, max_size=3),
       metadata=st.booleans(), pad=st.integers(0, 7))
def test_accepts_exactly_what_safetensors_accepts(tensors, mutations, metadata, pad):
    header, data = _file([(f"t{i}", d, s) for i, (d, s) in enumerate(tensors)])
    if metadata:
        header = {"__metadata__": {"format": "pt"}, **header}
    length_delta = 0
    for m in mutations:
        header, data, delta = _mutate(header, data, m)
        length_delta += delta
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        _write(path, header, data, pad, length_delta)
        assert _farcast_accepts(path) == _library_accepts(path), (header, len(data), pad, length_delta)


@pytest.mark.parametrize("offsets, match", [
    ([[-8, 16], [16, 32]], "bad header entry"),
    ([[0, 16], [8, 24]], "overlap the previous tensor"),
    ([[0, 16], [24, 40]], "leave a gap"),
])
def test_bad_offsets_are_named(tmp_path, offsets, match):
    header, data = _file([("a", "F32", [4]), ("b", "F32", [4])])
    for name, o in zip(("a", "b"), offsets):
        header[name]["data_offsets"] = o
    _write(tmp_path / "x.safetensors", header, data + bytes(8))
    with pytest.raises(CheckpointError, match=match):
        read_safetensors_header(tmp_path / "x.safetensors")
    assert not _library_accepts(tmp_path / "x.safetensors")
