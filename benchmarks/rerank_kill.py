"""SIGKILL a real rerank run mid-way; check that the previous rankings stay current and readable; rerun.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/rerank_kill.py [--config configs/demo.yaml]

Needs a config whose rankings table already has a version (run `make demo` first). Starts
``python -m jobs.rerank`` as its own process, kills its whole process tree (driver, Ray, actors)
with SIGKILL once the first queries are scored, checks the rankings version and a lookup, then
reruns the job to completion and checks that the new set is complete, without duplicates.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> int:
    import psutil

    from pipelines.config import load_config
    from pipelines.lookup import Rankings
    from pipelines.store import Store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    config = ap.parse_args().config
    cfg = load_config(config)
    store = Store(cfg.storage)
    before = store.rankings()
    print(f"before: rankings v{before.version}, {before.count_rows()} queries")
    job = [sys.executable, "-m", "jobs.rerank", "--config", config]
    proc = subprocess.Popen(job, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.time()
    for line in proc.stderr:  # the job's progress lines
        if line.startswith("rerank: ") and "pairs" in line:
            print("job progress:", line.strip())
            break
    staging = [n for n in store.table_names() if n.startswith("_staging-rankings")]
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    print(f"killed {len(family)} processes after {time.time() - t0:.0f}s; staging tables then: {staging}")

    after = store.rankings()
    unchanged = after.version == before.version and after.count_rows() == before.count_rows()
    query = after.search().select(["query"]).limit(1).to_arrow()["query"][0].as_py()
    hit = Rankings(cfg).lookup(query)
    print(f"after kill: rankings v{after.version}, {after.count_rows()} queries, unchanged: {unchanged}; "
          f"lookup {query[:50]!r} -> run {hit.run_id if hit else None}")

    t0 = time.time()
    rerun = subprocess.run(job, cwd=ROOT, capture_output=True, text=True, check=False)
    ids = store.rankings().to_arrow()["query_id"].to_pylist()
    print(rerun.stdout)
    print(f"rerun: exit {rerun.returncode} in {time.time() - t0:.0f}s; rankings v{store.rankings().version}, "
          f"{len(ids)} queries, {len(set(ids))} distinct")
    return 0 if unchanged and hit is not None and rerun.returncode == 0 and len(ids) == len(set(ids)) else 1


if __name__ == "__main__":
    sys.exit(main())
