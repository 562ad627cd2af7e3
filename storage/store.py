"""The run store: one Zarr v3 group per training run.

Layout (all metadata is JSON in ``zarr.json`` files, readable without farcast):

    <store>/zarr.json           root attributes:
        farcast  {"format": 1, "version": ...}
        source   the checkpoint directory, layout   its layout ("hf", "files", ...)
        config   the settings that made the store (memory budget, chunk length)
        tensors  {name: {path, shape, dtype, kind, chunk}}
        steps    the commit record: [{step, sources, nonfinite}, ...] (row i of every array)
    <store>/params/<name>/      one array per tensor, shape (rows, numel), chunks (1, chunk),
                                uncompressed; bf16/fp8 as exact uint16/uint8 bit patterns;
                                dimension names ("step", "<name>.i")
    <store>/step, <store>/params/step
                                the step of each row (int64, -1 on a row not yet committed): the
                                ``step`` coordinate that xarray.open_zarr(store, group="params") shows
    <store>/sample/             the values the fit samples (farcast_core.sampling.SampleLayout):
                                shape (rows, width), one chunk per row, float32 (float64 if a
                                tensor is), described by root attribute ``sample`` {size, seed,
                                dtype, width}; stores without it are fitted from params/

A step is visible only once its entry is appended to ``steps``, which is written last and
atomically (zarr's LocalStore writes a temporary file and renames it); the tensor manifest is
written in the same write as the first step, so a failed first ingest leaves no manifest
behind. Rows past the committed ones are leftovers of an interrupted ingest and are
overwritten by the next one. Writers hold ``storage.lock.StoreLock``; ``commit`` re-reads the
record from storage and refuses to commit a row that is not the next one, so a committed row
is never rewritten.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import zarr

from farcast_core.chunks import ChunkPlan
from farcast_core.dtypes import DTYPES
from farcast_core.errors import StoreError
from farcast_core.sampling import SampleLayout
from farcast.storage.lock import LOCK_NAME

FORMAT = 1


def _package_version() -> str:
    """farcast's version from the installed package's metadata (pyproject.toml is the one place it is set)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("farcast")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _package_version()  # recorded in stores, forecaster files and emitted metadata
TMP_DIR = ".farcast-tmp"  # chunk files being written (local stores); removed by the next writer
OURS = {LOCK_NAME, TMP_DIR}  # entries of a store directory that are farcast's, not zarr's
SAMPLE_CHUNK = 1 << 20  # columns per chunk of the sample array (a fit task reads the span of its batch)
STEP_ARRAYS = ("step", "params/step")  # the step coordinate, beside the sample array and beside the tensors


@dataclass(frozen=True)
class TensorMeta:
    """One tensor as the store records it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # source dtype, canonical name
    kind: str  # "float" (forecast) or "buffer" (kept, never forecast)
    chunk: int  # values per chunk along the parameter axis
    path: str  # array path inside the store

    @functools.cached_property  # a fit asks for every chunk's bounds: computed once per tensor
    def numel(self) -> int:
        return math.prod(self.shape)

    @functools.cached_property
    def plan(self) -> ChunkPlan:
        return ChunkPlan(self.numel, self.chunk)

    @classmethod
    def from_json(cls, d: dict) -> "TensorMeta":
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d["kind"], d["chunk"], d["path"])


def array_path(name: str) -> str:
    """A Zarr node path for a tensor name ('/' escaped; Zarr reserves a leading '__')."""
    p = quote(name, safe=".-_")
    if p == "step":  # params/step is the step coordinate
        return "params/%73tep"
    return "params/" + ("%5F" + p[1:] if p.startswith("__") else p)


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).resolve()


class RunStore:
    """A run's Zarr store: the coordinator's handle (metadata) and the workers' (chunk I/O)."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = url
        self.group = group
        self._arrays: dict[str, zarr.Array] = {}
        self._tensors: dict[str, TensorMeta] | None = None
        self._sample: SampleLayout | None = None
        self._root_path: Path | None = None
        self._sample_meta: dict | None = None  # defined, committed with the first step
        self._step_paths: list[str] | None = None

    @property
    def _root(self) -> Path:
        """The local store's directory, resolved once (Path.resolve costs a system call per part, and
        the chunk I/O asks for it on every read and write)."""
        if self._root_path is None:
            self._root_path = _local_path(self.url)
        return self._root_path

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, url: str | os.PathLike) -> "RunStore":
        """An existing store; StoreError if there is none at ``url``."""
        url = str(url)
        if _is_local(url) and _local_path(url).is_file():
            raise StoreError(f"{url}: is a file, not a store directory; pick another --store path")
        if _is_local(url) and not (_local_path(url) / "zarr.json").is_file():
            raise StoreError(f"{url}: no farcast store here; create one with 'farcast ingest CKPT_DIR --store {url}'")
        try:
            group = zarr.open_group(url, mode="r+", zarr_format=3)
        except Exception as e:
            raise StoreError(f"{url}: cannot open as a Zarr v3 store ({type(e).__name__}: {e})") from e
        if "farcast" not in group.attrs:
            raise StoreError(f"{url}: a Zarr store, but not one farcast wrote; pick another --store path")
        if group.attrs["farcast"].get("format") != FORMAT:
            raise StoreError(f"{url}: store format {group.attrs['farcast'].get('format')} is not {FORMAT}; re-ingest into a new store")
        return cls(url, group)

    @classmethod
    def open_or_create(cls, url: str | os.PathLike, source: Path, layout: str, config: dict) -> "RunStore":
        """The store for the run at ``source``, created empty if absent."""
        url = str(url)
        check_store_path(url)
        exists = (_local_path(url) / "zarr.json").is_file() if _is_local(url) else _remote_exists(url)
        if exists:
            store = cls.open(url)
            if store.source != str(source):
                raise StoreError(
                    f"{url}: holds the run from {store.source}, not {source}; use one store per run (another --store path)"
                )
            return store
        group = zarr.open_group(url, mode="a", zarr_format=3)  # not "w": it would delete the writer's lock file
        group.attrs.put(
            {
                "farcast": {"format": FORMAT, "version": VERSION},
                "source": str(source),
                "layout": layout,
                "config": config,
                "tensors": {},
                "steps": [],
            }
        )
        return cls(url, group)

    # ------------------------------------------------------------ metadata (coordinator only)

    @property
    def source(self) -> str:
        return self.group.attrs["source"]

    @property
    def layout(self) -> str:
        return self.group.attrs["layout"]

    @property
    def config(self) -> dict:
        return dict(self.group.attrs["config"])

    @property
    def step_records(self) -> list[dict]:
        return list(self.group.attrs["steps"])

    @property
    def steps(self) -> list[int]:
        return [r["step"] for r in self.group.attrs["steps"]]

    @property
    def tensors(self) -> dict[str, TensorMeta]:
        """The tensors of the run: recorded with the first step, or defined and not yet committed."""
        if self._tensors is None:
            recorded = self.group.attrs["tensors"] if self.group.attrs["steps"] else {}  # else: a failed first ingest's
            self._tensors = {n: TensorMeta.from_json(d) for n, d in recorded.items()}
        return self._tensors

    def define_tensors(self, metas: list[TensorMeta], sample: tuple[int, int] | None = None) -> None:
        """Create one empty array per tensor (before the first step); the manifest is committed with it.

        ``sample`` (size, seed): also keep the values a fit with that sample size and seed reads.
        """
        if self.steps:
            raise StoreError(f"{self.url}: tensors are fixed once a step is committed")
        self._sample = self._sample_meta = None
        floats = [m for m in metas if m.kind == "float"]
        if sample and floats:
            layout = _sample_layout(floats, *sample)
            dtype = _sample_dtype(floats)
            self.group.create_array("sample", shape=(0, layout.width), chunks=(1, min(layout.width, SAMPLE_CHUNK)),
                                    dtype=dtype, fill_value=0, compressors=None, overwrite=True,
                                    dimension_names=("step", "sample.i"))
            self._sample_meta = {"size": sample[0], "seed": sample[1], "dtype": dtype, "width": layout.width}
            self._sample = layout
        for m in metas:
            self.group.create_array(
                m.path,
                shape=(0, m.numel),
                chunks=(1, m.chunk),
                dtype=DTYPES[m.dtype].storage,
                fill_value=0,
                compressors=None,  # weights barely compress (~10% with Zstd); speed wins
                attributes=asdict(m),
                overwrite=True,  # leftovers of an interrupted first ingest
                dimension_names=("step", m.path.split("/", 1)[1] + ".i"),
            )
        for path in STEP_ARRAYS:  # 1024 steps per chunk: a run's rows rarely span more than one chunk file
            self.group.create_array(path, shape=(0,), chunks=(1024,), dtype="int64", fill_value=-1,
                                    compressors=None, overwrite=True, dimension_names=("step",))
        self._step_paths = list(STEP_ARRAYS)
        self._arrays, self._tensors = {}, {m.name: m for m in metas}

    def reserve(self, rows: int) -> None:
        """Make every array exactly ``rows`` rows long (rows past the committed ones are scratch)."""
        for m in self.tensors.values():
            a = self.array(m.name)
            if a.shape[0] != rows:
                a.resize((rows, m.numel))
        a = self._sample_array()
        if a is not None and a.shape[0] != rows:
            a.resize((rows, a.shape[1]))
        for a in self._step_arrays():
            if a.shape[0] != rows:
                a.resize((rows,))

    def _step_arrays(self) -> list[zarr.Array]:
        """The step coordinate arrays (absent from stores written before they existed); looked up once."""
        if self._step_paths is None:
            self._step_paths = [p for p in STEP_ARRAYS if p in self.group]
        return [self._node(p) for p in self._step_paths]

    def _write_steps(self, steps: list[int]) -> None:
        """Set the step coordinate's chunk holding the newest of ``steps`` (rows 0..len-1): the steps of
        the rows it covers, -1 past them. Written like the tensors' chunks (whole chunk, temp file and
        rename) on a local store: zarr's read-modify-write of one value cost ~10 ms a commit."""
        row = len(steps) - 1
        for a in self._step_arrays():
            if a.shape[0] <= row:
                a.resize((row + 1,))
            base = self._plain_dir(a.path)
            if base is None:
                a[row] = steps[row]
                continue
            size = a.chunks[0]
            lo = row // size * size
            chunk = np.full(size, -1, dtype="<i8")
            chunk[: row + 1 - lo] = steps[lo : row + 1]
            self._replace_file(base / str(row // size), chunk)

    @property
    def schedule(self) -> dict | None:
        """What the newest committed checkpoint recorded about its learning-rate schedule."""
        return self.group.attrs.get("schedule")

    def commit(self, row: int, record: dict, schedule: dict | None = None) -> None:
        """Make row ``row`` visible: append its step record and schedule facts (written last, in one write).

        The record is re-read from storage first: ``row`` must be the next row and the step newer
        than the newest committed one, else another writer got here first and nothing is written.
        """
        fresh = self._fresh_attrs()
        steps = list(fresh["steps"])
        if len(steps) != row or (steps and steps[-1]["step"] >= record["step"]):
            raise StoreError(
                f"{self.url}: changed by another writer while step {record['step']} was being written "
                f"(it now holds {len(steps)} steps, this writer filled row {row}); nothing was committed: rerun"
            )
        self._write_steps([r["step"] for r in steps] + [record["step"]])  # after the check, before the record
        attrs = fresh | {"steps": steps + [record], "schedule": schedule}
        if not steps:
            attrs["tensors"] = {n: asdict(m) for n, m in self.tensors.items()}
            attrs.pop("sample", None)
            if self._sample_meta:
                attrs["sample"] = self._sample_meta
        self.group.update_attributes(attrs)

    @property
    def schedule_reading(self) -> dict | None:
        """What farcast inferred from ``schedule`` when it was recorded (farcast_core.timeaxis.reading)."""
        return self.group.attrs.get("schedule_reading")

    def set_schedule_reading(self, reading: dict) -> None:
        """Record the schedule inferred from the newest facts (a cache: keyed by the facts' digest)."""
        self.group.update_attributes(self._fresh_attrs() | {"schedule_reading": reading})

    def set_schedule(self, schedule: dict) -> None:
        """Record schedule facts of the newest committed step that could not be read at its commit."""
        self.group.update_attributes(self._fresh_attrs() | {"schedule": schedule})

    def _fresh_attrs(self) -> dict:
        """The root attributes as storage holds them now (not as this handle cached them)."""
        return dict(zarr.open_group(self.url, mode="r", zarr_format=3).attrs.asdict())

    def sweep(self) -> int:
        """Remove what killed writers left in a local store (chunk and metadata temp files); returns how many.

        Call only while holding the store's lock: another writer's temp files would go too.
        """
        if not _is_local(self.url):
            return 0
        root, n = self._root, 0
        tmp = root / TMP_DIR
        if tmp.is_dir():
            n += sum(1 for _ in tmp.iterdir())
            shutil.rmtree(tmp, ignore_errors=True)
        for d in [root, *(p for p in (root / "params").glob("*") if p.is_dir())]:
            for p in d.glob("*.partial"):  # zarr's own temporary metadata files
                p.unlink(missing_ok=True)
                n += 1
        for name in ("sample", *STEP_ARRAYS):  # arrays zarr writes chunk by chunk: temp files beside the chunks
            for p in (root / name).rglob("*.partial"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    # ------------------------------------------------------------ the fit's sample

    @property
    def sample_layout(self) -> SampleLayout | None:
        """Which columns of the sample array hold which chunk's sampled values (None: no sample kept)."""
        if self._sample is None:
            meta = self.group.attrs.get("sample") if self.group.attrs["steps"] else None
            if meta:
                floats = [m for m in self.tensors.values() if m.kind == "float"]
                self._sample = _sample_layout(floats, meta["size"], meta["seed"])
        return self._sample

    def _sample_array(self) -> zarr.Array | None:
        if self._sample_meta is None and self.sample_layout is None:
            return None
        return self._node("sample")

    def write_sample(self, row: int, values: np.ndarray) -> None:
        """Row ``row`` of the sample array (every chunk's sampled values of one step)."""
        a = self._sample_array()
        a[row, :] = values.astype(a.dtype, copy=False)

    def read_sample(self, rows: list[int], start: int = 0, stop: int | None = None) -> np.ndarray:
        """Committed ``rows`` x columns [start, stop) of the sample array."""
        rows = _committed_rows(self.url, len(self.steps), rows)
        a = self._sample_array()
        stop = a.shape[1] if stop is None else stop
        base = self._plain_dir("sample")
        if base is not None:
            return np.stack([_read_files(base, a.chunks[1], r, start, stop, a.dtype) for r in rows])
        lo, hi = min(rows), max(rows) + 1
        block = a[lo:hi, start:stop]  # one call: zarr fetches the row chunks concurrently
        return block[[r - lo for r in rows]]

    # ------------------------------------------------------------ chunk I/O (safe from workers)

    def array(self, name: str) -> zarr.Array:
        return self._node(self.tensors[name].path)

    def _node(self, path: str) -> zarr.Array:
        """The array at ``path`` in the store (opened once; keyed by path: a tensor named 'sample' is
        params/sample, not the sample array)."""
        a = self._arrays.get(path)
        if a is None:
            a = self._arrays[path] = self.group[path]
        return a

    def _plain_dir(self, path: str) -> Path | None:
        """The directory of the array's chunk files where they are plain little-endian bytes of a local
        store, which we may read and write ourselves; None where zarr's own I/O is needed."""
        if not _is_local(self.url):
            return None
        meta = self._node(path).metadata
        plain = (
            [type(c).__name__ for c in meta.codecs] == ["BytesCodec"]
            and "big" not in str(getattr(meta.codecs[0], "endian", ""))
            and getattr(meta.chunk_key_encoding, "separator", None) == "/"
            and type(meta.chunk_key_encoding).__name__ == "DefaultChunkKeyEncoding"
        )
        return self._root / path / "c" if plain else None

    def write(self, name: str, row: int, start: int, values: np.ndarray) -> None:
        """Write values [start, start+len) of one row; callers own whole chunks."""
        path = self._chunk_file(name, row, start, values)
        if path is None:
            self.array(name)[row, start : start + values.size] = values
            return
        # Local store, uncompressed: write the chunk's bytes exactly as zarr would, ~5x faster
        # than zarr's write path here. Temporary name, then rename, as zarr's LocalStore does.
        m = self.tensors[name]
        if values.size < m.chunk:  # zarr keeps edge chunks full size, padded with the fill value
            values = np.concatenate([values, np.zeros(m.chunk - values.size, dtype=values.dtype)])
        self._replace_file(path, values)

    def _replace_file(self, path: Path, values: np.ndarray) -> None:
        """A chunk file holding ``values`` as little-endian bytes: temporary name, then rename, as zarr's
        LocalStore does."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = self._root / TMP_DIR
        tmp_dir.mkdir(exist_ok=True)
        tmp = tmp_dir / f"{os.getpid()}.{threading.get_ident()}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"), copy=False))).cast("B"))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(path)) from e

    def _chunk_file(self, name: str, row: int, start: int, values: np.ndarray) -> Path | None:
        """The chunk file to write directly, or None where zarr's own write path is needed."""
        m = self.tensors[name]
        if start % m.chunk or values.size > m.chunk:
            return None
        base = self._plain_dir(m.path)
        return None if base is None else base / str(row) / str(start // m.chunk)

    def read(
        self, name: str, rows: list[int] | slice, start: int = 0, stop: int | None = None, cols: np.ndarray | None = None
    ) -> np.ndarray:
        """Stored values of one tensor: committed ``rows`` x values [start, stop) (or the ``cols`` positions)."""
        idx = _committed_rows(self.url, len(self.steps), rows)
        a = self.array(name)
        if cols is not None:  # read the span of the wanted positions, keep those (one row in memory)
            start, stop = int(cols.min()), int(cols.max()) + 1
            cols = cols - start
        stop = a.shape[1] if stop is None else stop
        out = np.empty((len(idx), stop - start if cols is None else len(cols)), dtype=a.dtype)
        m = self.tensors[name]
        base = self._plain_dir(m.path) if m.numel else None
        for i, r in enumerate(idx):  # plain slicing: zarr's orthogonal selection is ~40x slower here
            row = _read_files(base, m.chunk, r, start, stop, a.dtype) if base else a[r, start:stop]
            out[i] = row if cols is None else row[cols]
        return out

    def nonfinite(self, n_rows: int | None = None) -> set[str]:
        """Tensors recorded with NaN/Inf in any of the first ``n_rows`` committed steps."""
        return _nonfinite(self.step_records[:n_rows])


class MemoryRunStore:
    """A run store in numpy arrays: the RunStore interface the fit and the forecast use, for a Jumper's
    history of a small model (``JumpConfig.history``). Zarr costs about 1 ms per read or write call
    and a commit several, more than a small model's training step; here a record is a copy.
    Nothing is persisted: it lives as long as its Jumper."""

    layout = "jump"
    source = ""
    schedule = None
    schedule_reading = None

    def __init__(self, url: str = "memory-run-store"):
        self.url, self.config = url, {}
        self._records: list[dict] = []
        self._tensors: dict[str, TensorMeta] = {}
        self._data: dict[str, np.ndarray] = {}
        self._sample: SampleLayout | None = None
        self._sample_data: np.ndarray | None = None

    @property
    def step_records(self) -> list[dict]:
        return list(self._records)

    @property
    def steps(self) -> list[int]:
        return [r["step"] for r in self._records]

    @property
    def tensors(self) -> dict[str, TensorMeta]:
        return self._tensors

    @property
    def sample_layout(self) -> SampleLayout | None:
        return self._sample

    def define_tensors(self, metas: list[TensorMeta], sample: tuple[int, int] | None = None) -> None:
        if self._records:
            raise StoreError(f"{self.url}: tensors are fixed once a step is committed")
        self._tensors = {m.name: m for m in metas}
        self._data = {m.name: np.zeros((0, m.numel), dtype=DTYPES[m.dtype].storage) for m in metas}
        floats = [m for m in metas if m.kind == "float"]
        self._sample = _sample_layout(floats, *sample) if sample and floats else None
        if self._sample is not None:
            self._sample_data = np.zeros((0, self._sample.width), dtype=_sample_dtype(floats))

    def reserve(self, rows: int) -> None:
        def grow(a: np.ndarray) -> np.ndarray:
            out = np.zeros((rows, a.shape[1]), dtype=a.dtype)
            n = min(rows, a.shape[0])
            out[:n] = a[:n]
            return out

        self._data = {n: grow(a) for n, a in self._data.items()}
        if self._sample_data is not None:
            self._sample_data = grow(self._sample_data)

    def commit(self, row: int, record: dict, schedule: dict | None = None) -> None:
        if len(self._records) != row or (self._records and self._records[-1]["step"] >= record["step"]):
            raise StoreError(f"{self.url}: row {row} (step {record['step']}) is not the next one")
        self._records.append(dict(record))

    def write(self, name: str, row: int, start: int, values: np.ndarray) -> None:
        self._data[name][row, start : start + values.size] = values

    def write_sample(self, row: int, values: np.ndarray) -> None:
        self._sample_data[row] = values

    def read_sample(self, rows: list[int], start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._sample_data[_committed_rows(self.url, len(self._records), rows), start:stop]

    def read(self, name: str, rows, start: int = 0, stop: int | None = None, cols: np.ndarray | None = None) -> np.ndarray:
        block = self._data[name][_committed_rows(self.url, len(self._records), rows)]
        return block[:, cols] if cols is not None else block[:, start:stop]

    def nonfinite(self, n_rows: int | None = None) -> set[str]:
        return _nonfinite(self._records[:n_rows])


def _committed_rows(url: str, n: int, rows: list[int] | slice) -> list[int]:
    """``rows`` (a list or a slice) as a list, refused unless each is one of the ``n`` committed rows."""
    idx = list(range(n)[rows]) if isinstance(rows, slice) else list(rows)
    if any(r >= n or r < 0 for r in idx):
        raise StoreError(f"{url}: rows {idx} asked, {n} committed")
    return idx


def _nonfinite(records: list[dict]) -> set[str]:
    """Tensors any of these step records lists with NaN/Inf."""
    return {name for r in records for name in r.get("nonfinite", [])}


def _sample_dtype(floats: list[TensorMeta]) -> str:
    """The sample array's dtype: float64 when a tensor is, else float32."""
    return "float64" if any(m.dtype == "float64" for m in floats) else "float32"


def _sample_layout(floats: list[TensorMeta], size: int, seed: int) -> SampleLayout:
    """Where each chunk of these float tensors keeps its sampled values in the sample array."""
    return SampleLayout.of([(m.name, i, len(range(*m.plan.bounds(i)))) for m in floats for i in range(m.plan.n_chunks)],
                           size, seed)


def check_store_path(url: str | os.PathLike) -> None:
    """Refuse a local --store path that is a file or a non-empty directory other than a store (before locking it)."""
    url = str(url)
    if not _is_local(url):
        return
    p = _local_path(url)
    if p.is_file():
        raise StoreError(f"{url}: is a file, not a store directory; pick another --store path")
    if p.is_dir() and not (p / "zarr.json").is_file() and any(c.name not in OURS for c in p.iterdir()):
        raise StoreError(f"{url}: exists and is not empty; pick an empty or new --store path")


def _remote_exists(url: str) -> bool:
    try:
        zarr.open_group(url, mode="r", zarr_format=3)
        return True
    except Exception:
        return False


def _read_files(base: Path, chunk: int, row: int, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
    """Values [start, stop) of one row of an array straight from its chunk files under ``base``
    (``RunStore._plain_dir``): what zarr reads, without its per-call overhead of ~1 ms, most of a
    backtest's or a jump's reading on small models (pinned to zarr's reads by tests/test_ingest.py).
    A chunk never written holds the fill value 0."""
    out = np.zeros(stop - start, dtype=dtype)
    base = base / str(row)
    dt = np.dtype(dtype).newbyteorder("<")
    for c in range(start // chunk, -(-stop // chunk)):
        lo, hi = max(start, c * chunk), min(stop, (c + 1) * chunk)
        try:
            with open(base / str(c), "rb") as f:
                f.seek((lo - c * chunk) * dt.itemsize)
                out[lo - start : hi - start] = np.fromfile(f, dtype=dt, count=hi - lo)
        except FileNotFoundError:
            pass
    return out


def scratch_location(owner, store_dir: str | os.PathLike | None = None, prefix: str = "farcast-"):
    """(directory, finalizer) of a store that lives as long as ``owner``: ``store_dir`` (kept: the caller's),
    or a new temporary directory, deleted by the finalizer (None for ``store_dir``), which runs when
    ``owner`` is collected or the process exits."""
    import tempfile
    import weakref

    if store_dir is not None:
        return Path(store_dir), None
    d = Path(tempfile.mkdtemp(prefix=prefix))
    return d, weakref.finalize(owner, shutil.rmtree, d, True)
