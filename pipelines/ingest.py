"""checkpoint dir --ingest--> Zarr store.

Incremental and idempotent: steps already in the store are left alone, new steps are
appended in step order, and a step older than the newest stored one is refused (the store
keeps rows in step order; re-ingest into a new store to add it). Every new step is checked
against the store's tensors from headers alone before a byte is written; a step becomes
visible only when its commit record is written, after all its data. One writer at a time
(``StoreLock``); what a killed writer left behind is removed first.

Provenance: each commit records the step's absolute path and every file's size and mtime, so
a later ingest or emit can tell the checkpoint it saw from one rewritten since (a run
restarted into the same directory).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from farcast_core import timeaxis
from farcast_core.chunks import chunk_plan
from farcast_core.config import IngestConfig
from farcast_core.dtypes import DTYPES, nonfinite
from farcast_core.errors import CheckpointError, SequenceMismatchError, StoreError
from farcast_core.sampling import SAMPLE, SEED
from farcast.storage.checkpoints import (
    Checkpoint, Discovery, TensorInfo, discover, file_manifest, is_inside, manifest_change, open_checkpoint,
)
from farcast.storage.lock import StoreLock
from farcast.storage.runs import default_store, remember_store, store_for
from farcast.storage.schedules import read_schedule_facts
from farcast.storage.store import RunStore, TensorMeta, array_path, check_store_path


@dataclass
class IngestReport:
    """What one ingest did."""

    store: str
    added: list[int] = field(default_factory=list)  # steps committed by this run
    present: list[int] = field(default_factory=list)  # steps already in the store (no-op)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    tensors: int = 0  # tensors per step
    bytes_written: int = 0
    nonfinite: dict[int, list[str]] = field(default_factory=dict)  # step -> tensors with NaN/Inf
    warnings: list[str] = field(default_factory=list)


def ingest(
    ckpt_dir: str | os.PathLike,
    store_url: str | os.PathLike,
    config: IngestConfig = IngestConfig(),
    on_step: Callable[[int, int, int], None] | None = None,
) -> IngestReport:
    """Append the complete checkpoints of ``ckpt_dir`` that the store lacks.

    ``on_step(step, done, total)`` is called after each step is committed.
    """
    found = discover(ckpt_dir)
    root = found.root
    _refuse_store_inside(store_url, root)
    check_store_path(store_url)
    with StoreLock(store_url):
        store = RunStore.open_or_create(store_url, root, found.layout, {"memory_budget_mb": config.memory_budget_mb})
        store.sweep()
        report = _ingest_locked(found, store, config, on_step)
    remember_store(root, store_url)  # later commands given the checkpoint directory find this store
    return report


def _ingest_locked(found: Discovery, store: RunStore, config: IngestConfig, on_step) -> IngestReport:
    root, store_url = found.root, store.url
    report = IngestReport(store=str(store_url), skipped=[(str(p), why) for p, why in found.skipped])
    if store.layout != found.layout:
        raise StoreError(f"{store_url}: was made from a '{store.layout}' layout, {root} is now '{found.layout}'")
    _check_unchanged(store, found)

    have = set(store.steps)
    report.present = [c.step for c in found.checkpoints if c.step in have]
    new = [c for c in found.checkpoints if c.step not in have]
    if have and new and new[0].step < max(have):
        older = [c.step for c in new if c.step < max(have)]
        raise StoreError(
            f"{root}: step(s) {older} are older than step {max(have)}, the newest in {store_url}; "
            f"the store keeps steps in order: ingest into a new --store to include them"
        )
    if not new:
        report.tensors = len(store.tensors)
        _reread_schedule(store, found, config)
        return report

    # Plan every new step from its headers before writing anything.
    infos = [_headers(c, config) for c in new]
    if not have:
        store.define_tensors(_metas(infos[0], config.memory_budget_mb * 2**20), sample=(SAMPLE, SEED))
    expected = store.tensors
    for c, info in zip(new, infos):
        _check_same(c, info, expected)
    report.tensors = len(expected)
    if not have and new[0].step != 0:
        first = new[0].step
        report.warnings.append(
            f"the earliest checkpoint is step {first}, not 0: it stands in for the initial weights w(s_0), which is "
            "fine (the backtest measures the forecasts as they are). "
            + ("The Trainer saves no step 0: to give farcast the real initial weights, save them before training "
               "with model.save_pretrained(f'{output_dir}/checkpoint-0')" if found.layout == "hf" else
               "To give farcast the real initial weights, save a checkpoint at step 0 beside the others")
        )

    store.reserve(len(have) + len(new))
    row = len(have)
    with ThreadPoolExecutor(config.workers) as pool:
        for i, c in enumerate(new):
            try:
                files = file_manifest(c.path)
                flagged, nbytes = _write_step(c, row, store, config, pool)
            except FileNotFoundError as e:
                raise CheckpointError(f"{e.filename or c.path}: vanished while step {c.step} was being ingested (rotated "
                                      "by the trainer?); nothing of it was committed: rerun") from e
            changed = manifest_change(c.path, files)
            if changed:
                raise CheckpointError(f"{changed} while step {c.step} was being ingested; nothing of it was committed: rerun")
            facts = read_schedule_facts(c, config.allow_pickle)
            store.commit(row, {"step": c.step, "path": str(c.path), "sources": [str(f) for f in c.files],
                               "files": files, "nonfinite": flagged}, facts)
            report.added.append(c.step)
            report.bytes_written += nbytes
            if flagged:
                report.nonfinite[c.step] = flagged
            row += 1
            if on_step:
                on_step(c.step, i + 1, len(new))
    _record_reading(store)
    store.sweep()  # the temporary-file directory the writes used
    return report


def _record_reading(store: RunStore) -> None:
    """Infer the schedule from the newest facts once, here, for every fit, backtest and emit to reuse."""
    facts = store.schedule  # as the last commit wrote it
    if facts is None:
        return
    recorded = store.schedule_reading
    if not recorded or recorded.get("facts") != timeaxis.facts_key(facts):
        store.set_schedule_reading(timeaxis.reading(facts))


def _check_unchanged(store: RunStore, found: Discovery) -> None:
    """Refuse a run whose already-ingested checkpoints were rewritten (a restart into the same directory)."""
    by_step = {c.step: c for c in found.checkpoints}
    for rec in store.step_records:
        c = by_step.get(rec["step"])
        if c is None or "files" not in rec:  # rotated away, or ingested before provenance was recorded
            continue
        changed = manifest_change(c.path, rec["files"])
        if changed:
            raise StoreError(
                f"{changed}: step {rec['step']} in {store.url} no longer matches its checkpoint; the run was "
                f"restarted into {found.root} or the checkpoint rewritten. Ingest into a new --store"
            )


def _reread_schedule(store: RunStore, found: Discovery, config: IngestConfig) -> None:
    """Schedule facts that the newest step's files did not give at its commit, read again now."""
    if store.schedule is not None or not store.steps:
        return
    newest = next((c for c in found.checkpoints if c.step == store.steps[-1]), None)
    facts = newest and read_schedule_facts(newest, config.allow_pickle)
    if facts:
        store.set_schedule(facts)
        _record_reading(store)


def _refuse_store_inside(store_url, root: Path) -> None:
    s = str(store_url)
    if "://" in s and not s.startswith("file://"):
        return
    if is_inside(s.removeprefix("file://"), root):
        raise StoreError(
            f"{Path(s.removeprefix('file://')).resolve()}: the store may not be inside the checkpoint directory {root} "
            "(the trainer scans and rotates it); pick a --store path outside it"
        )


def _headers(c: Checkpoint, config: IngestConfig) -> dict[str, TensorInfo]:
    with open_checkpoint(c, config.allow_pickle) as r:
        return dict(r.tensors)


def _metas(info: dict[str, TensorInfo], budget: int) -> list[TensorMeta]:
    metas = []
    for name, t in info.items():
        kind = "float" if DTYPES[t.dtype].is_float else "buffer"
        metas.append(TensorMeta(name, t.shape, t.dtype, kind, chunk_plan(t.numel, budget).chunk, array_path(name)))
    return metas


def _check_same(c: Checkpoint, info: dict[str, TensorInfo], expected: dict[str, TensorMeta]) -> None:
    missing = sorted(set(expected) - set(info))
    extra = sorted(set(info) - set(expected))
    if missing:
        raise SequenceMismatchError(
            f"{c.path}: step {c.step} lacks tensor '{missing[0]}'"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; every checkpoint of a run must hold the same tensors: move this checkpoint aside or use a new store"
        )
    if extra:
        raise SequenceMismatchError(
            f"{info[extra[0]].file}: step {c.step} has tensor '{extra[0]}' that earlier steps lack; "
            "every checkpoint of a run must hold the same tensors: use a new store for the new architecture"
        )
    for name, m in expected.items():
        t = info[name]
        if t.shape != m.shape or t.dtype != m.dtype:
            raise SequenceMismatchError(
                f"{t.file}: tensor '{name}' is {t.dtype}{list(t.shape)} at step {c.step} but "
                f"{m.dtype}{list(m.shape)} in earlier steps; a run's tensors must keep shape and dtype: "
                "use a new store for the changed model"
            )


def _write_step(c: Checkpoint, row: int, store: RunStore, config: IngestConfig, pool) -> tuple[list[str], int]:
    """Copy one checkpoint into row ``row``, chunk by chunk; returns (tensors with NaN/Inf, bytes)."""
    metas = list(store.tensors.values())
    layout = store.sample_layout  # the fit's sample of each chunk, kept in one small array
    sampled = np.empty(layout.width, dtype=np.float64) if layout else None
    with open_checkpoint(c, config.allow_pickle) as reader:

        def one(job: tuple[TensorMeta, int]) -> tuple[str, bool, int]:
            m, i = job
            a, b = m.plan.bounds(i)
            values = reader.read(m.name, a, b)
            bad = m.kind == "float" and nonfinite(values, m.dtype)
            store.write(m.name, row, a, values)
            if layout and m.kind == "float":
                layout.take(sampled, m.name, i, values, m.dtype)
            return m.name, bad, values.nbytes

        jobs = [(m, i) for m in metas for i in range(m.plan.n_chunks)]
        flagged, nbytes = set(), 0
        # DCP readers load whole tensors and keep one: feed them one tensor at a time.
        results = map(one, jobs) if c.format == "dcp" else pool.map(one, jobs)
        for name, bad, n in results:
            nbytes += n
            if bad:
                flagged.add(name)
    if layout:
        store.write_sample(row, sampled)
    return sorted(flagged), nbytes


def steps_text(steps: list[int], show: int = 6) -> str:
    """[0, 3, 6] when short; else the first and last few: [0, 3, 6, ..., 174, 177, 180]."""
    if len(steps) <= show:
        return str(steps)
    head, tail = steps[: show // 2], steps[-(show // 2):]
    return f"[{', '.join(map(str, head))}, ..., {', '.join(map(str, tail))}]"


__all__ = ["IngestConfig", "IngestReport", "default_store", "ingest", "steps_text", "store_for"]
