"""The `farcast` command. Errors print as one line and exit non-zero, never a traceback."""

from __future__ import annotations

import json
import sys

import click

from farcast_core.errors import FarcastError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FarcastError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option("0.1.0", prog_name="farcast")
def main() -> None:
    """Forecast a training run's weights far ahead from its checkpoints."""


@main.command()
@click.argument("ckpt_dir", type=click.Path(file_okay=False))
@click.option("--store", "store", required=True, help="Zarr store for this run (path or fsspec URL), outside CKPT_DIR.")
@click.option("--memory-budget-mb", default=512, show_default=True, help="Memory for one chunk in flight; sets the chunk length of a new store.")
@click.option("--allow-pickle", is_flag=True, help="Load torch pickles that hold Python objects beyond tensors (only for files you trust).")
@click.option("--workers", default=4, show_default=True, help="Threads copying chunks.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def ingest(ckpt_dir, store, memory_budget_mb, allow_pickle, workers, as_json) -> None:
    """Add the new checkpoints of CKPT_DIR to the run's Zarr store."""
    from pipelines.ingest import IngestConfig, ingest as run_ingest

    def progress(step, done, total):
        if not as_json:
            click.echo(f"  committed step {step} ({done}/{total})", err=True)

    cfg = IngestConfig(memory_budget_mb=memory_budget_mb, allow_pickle=allow_pickle, workers=workers)
    r = run_ingest(ckpt_dir, store, cfg, on_step=progress)
    if as_json:
        click.echo(json.dumps(r.__dict__))
        return
    for path, why in r.skipped:
        click.echo(f"skipped {path}: {why}")
    for w in r.warnings:
        click.echo(f"warning: {w}")
    for step, names in r.nonfinite.items():
        click.echo(f"warning: step {step} has NaN/Inf in {len(names)} tensor(s), e.g. '{names[0]}' (recorded; forecasting excludes them)")
    if r.added:
        click.echo(f"added {len(r.added)} step(s) {r.added} x {r.tensors} tensors, {r.bytes_written / 2**20:.1f} MiB -> {r.store}")
    else:
        click.echo(f"nothing new: the store already holds steps {r.present}")
    if r.present and r.added:
        click.echo(f"already present: {len(r.present)} step(s)")


@main.command()
@click.argument("out", default="farcast-demo", type=click.Path(file_okay=False))
@click.option("--steps", default=60, show_default=True, help="Optimizer steps of the demo training run.")
@click.option("--every", default=5, show_default=True, help="Save a checkpoint every this many steps.")
def demo(out, steps, every) -> None:
    """Train a small real model (digits MLP), save its checkpoints, ingest them into a store.

    Forecasting and emitting (issues 3-5) are not built yet; this runs the part that is.
    """
    from pathlib import Path

    from pipelines.demo import write_digits_run
    from pipelines.ingest import ingest as run_ingest, store_summary

    out = Path(out)
    click.echo(f"training a digits MLP for {steps} steps, a checkpoint every {every} ...")
    run = write_digits_run(out / "checkpoints", steps=steps, every=every)
    r = run_ingest(run, out / "store")
    s = store_summary(out / "store")
    click.echo(f"ingested {len(r.added)} new step(s); the store holds steps {s['steps']}: "
               f"{s['tensors']} tensors, {s['float_values']} forecastable values")
    click.echo(f"checkpoints: {run}\nstore:       {out / 'store'}")
    click.echo("next: forecasting and emitting a checkpoint are not built yet (issues 3-5)")


if __name__ == "__main__":
    main()
