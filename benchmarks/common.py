"""Shared by the benchmark scripts that run batchrank jobs as users run them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(name: str, config: Path) -> dict:
    """Run ``python -m jobs.<name> --config <config>`` (its summary streams to our stdout) and return its JSON report
    (every job's summary names it), with ``wall_seconds`` added."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"jobs.{name}", "--config", str(config)], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True, check=False)
    print(proc.stdout, flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"jobs.{name} --config {config} failed ({proc.returncode})")
    path = re.findall(r"reports?: (?:.*?)(\S+\.json)\b", proc.stdout)[-1]
    report = json.loads(Path(path).read_text())
    report["wall_seconds"] = round(time.perf_counter() - t, 1)
    return report


def cpu_model() -> str:
    """The CPU's model name (every figure names the machine it was measured on)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
