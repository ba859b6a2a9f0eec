"""The package contract: every subpackage is installed, the CLI answers --help without loading models.
(``import autocomp`` staying light is checked in test_architecture.py; a real wheel in test_wheel.py.)"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_cli_help_does_not_load_models():
    proc = subprocess.run([sys.executable, "-m", "autocomp.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("search", "pareto", "recommend", "compress", "export", "spaces", "worker"):
        assert command in proc.stdout
    probe = ("import sys, runpy; sys.argv = ['autocomp', '--help']\n"
             "try:\n    runpy.run_module('autocomp.cli', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print(' '.join(m for m in ('torch', 'transformers', 'ray', 'lm_eval') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].strip() == "", f"autocomp --help loaded {proc.stdout.splitlines()[-1]}"


def _find_config() -> dict:
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert isinstance(tool.get("packages"), dict) and "find" in tool["packages"], \
        "pyproject.toml: [tool.setuptools.packages.find] finds the subpackages (no hand-kept list)"
    return tool["packages"]["find"]


def test_every_folder_with_modules_is_a_package_setuptools_finds():
    """A non-editable install ships only the packages setuptools finds: every folder of autocomp that
    holds .py files must have an __init__.py and be found by [tool.setuptools.packages.find]."""
    from setuptools import find_packages

    find = _find_config()
    found = set(find_packages(where=str(ROOT / find.get("where", ["."])[0]), include=find.get("include", ["*"]),
                              exclude=find.get("exclude", ())))
    folders = {p.parent for p in (ROOT / "autocomp").rglob("*.py") if "__pycache__" not in p.parts}
    names = {".".join(f.relative_to(ROOT).parts) for f in folders}
    without_init = sorted(".".join(f.relative_to(ROOT).parts) for f in folders if not (f / "__init__.py").exists())
    assert not without_init, f"folders with modules but no __init__.py: {without_init}"
    assert names <= found, f"not found by setuptools: {sorted(names - found)}"
    assert {n for n in found if n.split(".")[0] == "autocomp"} == names, sorted(found - names)


def test_builtin_spaces_are_package_data():
    """The built-in spaces live in the package and pyproject.toml ships them."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    from autocomp.config.space import BUILTIN_DIR

    assert BUILTIN_DIR.is_relative_to(ROOT / "autocomp")
    rel = BUILTIN_DIR.relative_to(ROOT / "autocomp" / "config")
    assert f"{rel.as_posix()}/*.yaml" in tool.get("package-data", {}).get("autocomp.config", [])
    assert {p.stem for p in BUILTIN_DIR.glob("*.yaml")} >= {"bits", "demo", "latency", "mixed", "sparsity", "students"}
