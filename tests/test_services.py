"""The test services themselves: PostgreSQL, the shared Ray cluster and a private one that loses a node."""

import pytest

import cluster

pytestmark = pytest.mark.cluster


def test_postgres_connects(postgres_url):
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    engine = sa.create_engine(cluster.sqlalchemy_url(postgres_url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as con:
            assert con.execute(sa.text("SELECT current_user")).scalar_one() == make_url(postgres_url).username
    finally:
        engine.dispose()


def test_optuna_study_on_fresh_database(fresh_postgres_url, postgres_url):
    import optuna
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    assert make_url(fresh_postgres_url).database != make_url(postgres_url).database
    url = cluster.sqlalchemy_url(fresh_postgres_url)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": sa.pool.NullPool})
    study = optuna.create_study(study_name="services", storage=storage, directions=["minimize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_int("bits", 2, 8)), n_trials=3)
    assert len(optuna.load_study(study_name="services", storage=url).trials) == 3
    storage.engine.dispose()


def test_fresh_database_is_dropped(postgres_url):
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    url = cluster.create_database(postgres_url)
    name = make_url(url).database
    engine = sa.create_engine(cluster.sqlalchemy_url(url), poolclass=sa.pool.NullPool)
    held = engine.connect()  # an open connection must not block the drop
    try:
        cluster.drop_database(url)
    finally:
        held.close()
        engine.dispose()
    admin = sa.create_engine(cluster.sqlalchemy_url(postgres_url), poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as con:
            left = con.execute(sa.text("SELECT count(*) FROM pg_database WHERE datname = :n"), {"n": name}).scalar_one()
    finally:
        admin.dispose()
    assert left == 0


def test_ray_cluster_has_two_nodes(ray_address):
    assert cluster.alive_ray_nodes(ray_address) >= 2


def test_private_cluster_detects_lost_node(tmp_path):
    ray = pytest.importorskip("ray")

    with cluster.start_private_ray_cluster(tmp_path, cluster.free_port(), node_resources={"doomed": 1}) as c:
        assert len(c.nodes) == 1
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        try:
            head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"])
            # the driver attaches to the head's raylet (Ray prefers it): losing the other node spares it
            assert ray.get_runtime_context().get_node_id() == head

            @ray.remote(num_cpus=1, resources={"doomed": 1}, max_retries=0)
            def where():
                return ray.get_runtime_context().get_node_id()

            doomed = ray.get(where.remote(), timeout=60)
            assert doomed != head
            c.kill_node(0)
            elapsed = cluster.wait_node_dead(doomed, timeout=30)
            print(f"node death detected after {elapsed:.1f} s")
            alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            assert alive == [head]
        finally:
            ray.shutdown()
