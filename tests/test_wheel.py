"""A real install: the wheel built from this tree, installed into a fresh virtual environment (no
editable install), lists the built-in spaces and runs a tiny search with one of them.

The fresh environment gets the dependencies from the test environment's site-packages through a
``.pth`` file holding that folder as a plain line: a plain line only adds the folder to ``sys.path``;
the ``.pth`` files inside it (among them the editable install of this repository) are not processed.
Everything runs from a folder outside the repository, offline. Skipped only when no wheel can be built
for lack of setuptools (or, before setuptools 70.1, of ``wheel``); under ``AUTOCOMP_REQUIRE_WHEEL=1``
that fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import optuna
import pytest
from cli_helpers import COMPLETE, WAITING, assert_ok, cli_env, sqlite_url

ROOT = Path(__file__).resolve().parent.parent
BUILTIN_SPACES = {"bits", "sparsity", "mixed", "demo", "students", "latency"}
# what the build reads: pyproject.toml names the readme; the package with its data
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.py", "setup.cfg")


def _wheel_tools_missing() -> str | None:
    try:
        import setuptools
    except ImportError:
        return "setuptools is not installed"
    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    if (major, minor) < (70, 1):
        try:
            import wheel  # noqa: F401
        except ImportError:
            return f"setuptools {setuptools.__version__} needs the wheel package to build wheels"
    return None


def _run(command: list, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A fresh venv with the wheel of this tree installed; returns its folder."""
    missing = _wheel_tools_missing()
    if missing:
        if os.environ.get("AUTOCOMP_REQUIRE_WHEEL") == "1":
            pytest.fail(f"cannot build the wheel: {missing} (AUTOCOMP_REQUIRE_WHEEL=1)", pytrace=False)
        pytest.skip(f"cannot build the wheel: {missing}")
    base = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    # build from a copy, so the build's scratch folders (build/, *.egg-info) never land in the repository
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "autocomp", src / "autocomp", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = base / "dist"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", dist, src], base, env)
    assert_ok(built)
    (wheel,) = dist.glob("autocomp-*.whl")

    venv = base / "venv"
    assert_ok(_run([sys.executable, "-m", "venv", "--without-pip", venv], base, env))
    python = venv / "bin" / "python"
    assert_ok(_run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel],
                   base, env))
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base, env)
                .stdout.strip())
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "autocomp_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return venv


@pytest.fixture
def outside(tmp_path) -> Path:
    work = tmp_path / "elsewhere"
    work.mkdir()
    return work


def _env(cache: Path) -> dict:
    env = cli_env(cache)
    env.pop("PYTHONPATH", None)
    return env


def test_the_installed_package_is_the_wheel_not_the_repository(fresh, outside, cache_dir):
    code = ("import autocomp, autocomp.config.space as s, importlib.metadata as m; print(autocomp.__file__); "
            "print(s.BUILTIN_DIR); print(m.version('autocomp'))")
    proc = _run([fresh / "bin" / "python", "-c", code], outside, _env(cache_dir))
    assert_ok(proc)
    package, spaces, version = proc.stdout.split("\n")[:3]
    assert Path(package).resolve().is_relative_to(fresh.resolve()), package
    assert not Path(package).resolve().is_relative_to(ROOT), package
    assert Path(spaces).resolve().is_relative_to(fresh.resolve()) and Path(spaces).is_dir()
    import autocomp

    assert version == autocomp.__version__


def test_the_console_script_lists_the_builtin_spaces(fresh, outside, cache_dir):
    proc = _run([fresh / "bin" / "autocomp", "spaces"], outside, _env(cache_dir))
    assert_ok(proc)
    names = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
    assert BUILTIN_SPACES <= names, proc.stdout


def test_a_tiny_search_with_a_builtin_space(fresh, outside, tiny_models, cache_dir):
    from autocomp.inputs.data import load_named_split

    text = outside / "text.txt"
    text.write_text(load_named_split("wikitext2", "validation").text[:40_000])
    url = sqlite_url(outside / "study.db")
    proc = _run([fresh / "bin" / "autocomp", "search", "--model", tiny_models["llama"], "--space", "bits",
                 "--trials", 2, "--eval-windows", 2, "--eval-seq-len", 32, "--calib-windows", 2, "--calib-seq-len", 32,
                 "--data", text, "--storage", url, "--study-name", "wheel", "--no-progress", "--no-validate"],
                outside, _env(cache_dir))
    assert_ok(proc)
    trials = optuna.load_study(study_name="wheel", storage=url).get_trials()
    done = [t for t in trials if t.state == COMPLETE]
    assert len(done) == 2 and {t.state for t in trials} <= {COMPLETE, WAITING}   # the other baselines stay queued
    assert all(t.user_attrs.get("baseline") for t in done)     # the space's uniform baselines run first
    assert {k.split(":")[-1] for t in done for k in t.params} == {"bits"}
    assert "2 completed trials" in proc.stderr, proc.stderr
