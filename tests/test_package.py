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


def test_every_subpackage_is_listed_for_installation():
    """A non-editable install ships only the packages pyproject.toml lists: every folder of autocomp
    with an __init__.py must be there."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "autocomp").rglob("__init__.py")}
    assert found <= listed, f"missing from [tool.setuptools] packages: {sorted(found - listed)}"
