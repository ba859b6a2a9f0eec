"""The package contract: importing it is light (no torch, Ray, lm-eval, no GPU touched)."""

import subprocess
import sys


def test_import_autocomp_is_light():
    code = ("import sys, autocomp; heavy = [m for m in ('torch', 'ray', 'lm_eval', 'transformers', 'optuna') "
            "if m in sys.modules]; print(heavy); assert not heavy, heavy; print(autocomp.__version__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "[]"


def test_cli_help_does_not_load_models():
    proc = subprocess.run([sys.executable, "-m", "autocomp.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("search", "pareto", "recommend", "compress", "export"):
        assert command in proc.stdout
