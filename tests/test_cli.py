"""The command line answers fast and without torch; jobs are thin and fail with clear messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from pipelines.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'index' in r.output and 'search' in r.output; "
            "heavy = [m for m in ('torch', 'ray', 'lancedb', 'sentence_transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_console_script_help():
    exe = Path(sys.executable).parent / "batchrank"
    if not exe.exists():
        import pytest

        pytest.skip("batchrank console script not installed (pip install -e .)")
    out = subprocess.run([str(exe), "index", "--help"], capture_output=True, text=True, check=True)
    assert "--config" in out.stdout


def test_job_with_bad_config_exits_2_and_names_the_key(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("corpus:\n  path: x.jsonl\nembed:\n  batch_size: 0\n")
    out = subprocess.run([sys.executable, "-m", "jobs.index", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "embed.batch_size" in out.stderr and "(got 0)" in out.stderr


def test_job_with_missing_corpus_exits_1_with_the_path(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"storage:\n  uri: {tmp_path / 'db'}\ncorpus:\n  path: {tmp_path / 'missing.jsonl'}\n")
    out = subprocess.run([sys.executable, "-m", "jobs.index", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, env={"RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin",
                                                              "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1
    assert "missing.jsonl" in out.stderr and "does not exist" in out.stderr
