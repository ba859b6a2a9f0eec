import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# offline before any Hugging Face library is imported (they read these at import time)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny import ARCHS, build_tiny_model, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    train_tokenizer(root / "tokenizer")
    return root


@pytest.fixture(scope="session")
def tiny_models(tiny_root) -> dict[str, Path]:
    return {arch: build_tiny_model(arch, tiny_root / arch, tiny_root / "tokenizer") for arch in ARCHS}


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """The tiny models' tensors are small: intra-op threads only add overhead (about 10x on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama(tiny_models):
    """The tiny Llama, loaded (``LoadedModel``), once per test module."""
    from autocomp.inputs.models import load_model

    return load_model(str(tiny_models["llama"]))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The folder the autouse ``isolated_cache`` points AUTOCOMP_CACHE at (for CLI subprocesses)."""
    return tmp_path_factory.getbasetemp() / "autocomp-cache"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "autocomp-cache"
    monkeypatch.setenv("AUTOCOMP_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yield


# ---------------------------------------------------------------- real services (`cluster` tests)
# PostgreSQL and Ray from scripts/services.sh (CI starts them; locally: `bash scripts/services.sh start`
# and source the env.sh it prints). Missing services skip the test, or fail it under
# AUTOCOMP_REQUIRE_CLUSTER=1 (CI). Helpers, and a private Ray cluster for tests that kill nodes: cluster.py.

import cluster  # noqa: E402


def _missing_service(what: str) -> None:
    message = f"no {what}: {cluster.HINT}"
    if cluster.require_cluster():
        pytest.fail(f"{message} ({cluster.REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the test PostgreSQL database (``AUTOCOMP_TEST_POSTGRES_URL``), checked to connect. It is a
    plain ``postgresql://`` URL: for SQLAlchemy/Optuna use ``cluster.sqlalchemy_url(url)`` (psycopg2)."""
    url = os.environ.get(cluster.POSTGRES_ENV, "")
    if not url:
        _missing_service("PostgreSQL")
    try:
        cluster.check_postgres(url)
    except Exception as exc:  # driver errors of many types
        from sqlalchemy.engine import make_url

        shown = make_url(url).render_as_string(hide_password=True)
        pytest.fail(f"{cluster.POSTGRES_ENV}={shown} is set but connecting fails: {exc}; {cluster.HINT}",
                    pytrace=False)
    return url


@pytest.fixture
def fresh_postgres_url(postgres_url) -> str:
    """URL of a new, empty database on the test server, dropped after the test."""
    url = cluster.create_database(postgres_url)
    yield url
    cluster.drop_database(url)


@pytest.fixture(scope="session")
def ray_address() -> str:
    """Address of the shared test Ray cluster (``AUTOCOMP_TEST_RAY_ADDRESS``), checked to have 2+ alive
    nodes. Do not kill its nodes: use ``cluster.start_private_ray_cluster`` for that."""
    address = os.environ.get(cluster.RAY_ENV, "")
    if not address:
        _missing_service("Ray cluster")
    try:
        alive = cluster.alive_ray_nodes(address)
    except Exception as exc:
        pytest.fail(f"{cluster.RAY_ENV}={address} is set but Ray does not answer: {exc}; {cluster.HINT}", pytrace=False)
    if alive < 2:
        pytest.fail(f"the Ray cluster at {address} has {alive} alive node(s), the tests need 2; {cluster.HINT}",
                    pytrace=False)
    return address
