"""Running the autocomp CLI from tests (shared by test_cli.py and test_study.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SMALL = ["--eval-windows", "4", "--eval-seq-len", "64", "--calib-windows", "4", "--calib-seq-len", "64", "--no-progress"]


def cli_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["AUTOCOMP_CACHE"] = str(cache)
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def cli_command() -> list[str]:
    script = Path(sys.executable).parent / "autocomp"
    return [str(script)] if script.exists() else [sys.executable, "-m", "autocomp.cli"]


def run_cli(args: list, cwd: Path, cache: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command() + [str(a) for a in args], cwd=cwd, env=cli_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
