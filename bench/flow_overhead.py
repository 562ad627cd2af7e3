"""Orchestration overhead: the end-to-end Prefect flow against the same pipeline functions called directly.

Both run in fresh child processes on the same real run (digits MLP, Adam, 13 checkpoints), so
each pays its own imports; the flow also pays Prefect's temporary local server (no
PREFECT_API_URL) or the round trips to a real one (PREFECT_API_URL set). Prints both wall times,
the ratio: with a new PREFECT_HOME (database created), with it reused (as for any user after the
first run), a second flow run in the same process (no server start), and the flow on the Dask
task runner (a 2-worker LocalCluster) against the thread runner, both with PREFECT_HOME reused.

    python bench/flow_overhead.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from farcast.examples import write_digits_run  # noqa: E402

DIRECT = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
from farcast.pipelines.emit import EmitConfig, emit
from farcast.pipelines.ingest import ingest
ingest({run!r}, {store!r})
emit({store!r}, {out!r}, ratio=1.5, config=EmitConfig(allow_worse=True))
print(json.dumps({{"total": time.perf_counter() - t0}}))
"""

FLOW = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
from farcast.flows.flows import farcast_flow, with_runner
flow = with_runner(farcast_flow, {runner!r}, workers=2, dask_processes={processes!r})
t1 = time.perf_counter()
flow({run!r}, {out!r}, ratio=1.5, store={store!r}, emit_config={{"allow_worse": True}})
t2 = time.perf_counter()
flow({run!r}, {out!r} + "2", ratio=1.5, store={store!r} + "2", emit_config={{"allow_worse": True}})
t3 = time.perf_counter()
print(json.dumps({{"total": t2 - t0, "import": t1 - t0, "second_run": t3 - t2}}))
"""


def child(code: str, env_home: Path) -> dict:
    import os

    env = {**os.environ, "PREFECT_HOME": str(env_home), "PREFECT_LOGGING_LEVEL": "WARNING"}
    p = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="farcast-overhead-"))
    try:
        run = write_digits_run(work / "run", steps=60, every=5, optimizer="adam", lr=1e-3, hidden=96)
        args = dict(repo=str(REPO), run=str(run))
        direct = child(DIRECT.format(store=str(work / "s1"), out=str(work / "o1"), **args), work / "home")
        flow = child(FLOW.format(store=str(work / "s2"), out=str(work / "o2"), runner="threads", processes=False, **args), work / "home")
        warm = child(FLOW.format(store=str(work / "s4"), out=str(work / "o4"), runner="threads", processes=False, **args), work / "home")
        dask = child(FLOW.format(store=str(work / "s5"), out=str(work / "o5"), runner="dask", processes=False, **args),
                     work / "home")
        daskp = child(FLOW.format(store=str(work / "s7"), out=str(work / "o7"), runner="dask", processes=True, **args),
                      work / "home")
        warm2 = child(FLOW.format(store=str(work / "s6"), out=str(work / "o6"), runner="threads", processes=False, **args), work / "home")
        direct2 = child(DIRECT.format(store=str(work / "s3"), out=str(work / "o3"), **args), work / "home")
        d = (direct["total"] + direct2["total"]) / 2
        print("orchestration overhead: ingest -> fit -> backtest -> emit on a 13-checkpoint digits run")
        print(f"direct pipeline calls (mean of 2)   {d:7.2f} s")
        print(f"Prefect flow, new PREFECT_HOME      {flow['total']:7.2f} s  (x{flow['total'] / d:.2f}; imports {flow['import']:.2f} s)")
        print(f"Prefect flow, PREFECT_HOME reused   {warm['total']:7.2f} s  (x{warm['total'] / d:.2f}; the usual case)")
        print(f"Prefect flow, second run            {flow['second_run']:7.2f} s  (x{flow['second_run'] / d:.2f})")
        t = (warm["total"] + warm2["total"]) / 2
        for name, r in (("Dask runner (2 workers)", dask), ("Dask, worker processes", daskp)):
            print(f"{name:<36}{r['total']:7.2f} s  vs threads {t:.2f} s (mean of 2): x{r['total'] / t:.2f}; "
                  f"second run in the same process {r['second_run']:.2f} s vs {warm['second_run']:.2f} s: "
                  f"x{r['second_run'] / warm['second_run']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
