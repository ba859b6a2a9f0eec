"""``write_report`` and ``run_dashboard`` on small studies built directly in a temporary SQLite storage
(no model is loaded): the files, the CSV, the page in headless Chromium (no script errors, no network,
as many points as trials), the heatmap menu, a study with no feasible trial, validation results and
the dashboard."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
from cluster import free_port

from autocomp.errors import DependencyError, ReportError, StorageError, TrialNotFoundError
from autocomp.front import pareto_front, recommend
from autocomp.store.records import load_records
from autocomp.config.objectives import Budgets
from autocomp.reporting import write_report
from autocomp.reporting.context import build_report_data
from autocomp.reporting.figures import front_figure, heatmap_figure
from autocomp.reporting.layers import NON_BLOCK, layer_grid
from autocomp.reporting.page import HEATMAP_DIV
from autocomp.config.space import SearchSpace
from autocomp.config.spec import StudySpec
from autocomp.store.schema import DENSE_ATTR, HASH_ATTR, SPEC_ATTR

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
LAYER_TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
N_BLOCKS = 4
DENSE_PPL = 30.0
DENSE_MB = 100.0
EVIL = '<img src=x onerror="window.__xss=1">'

# (perplexity, size_mb, avg bits, uniform name, with the embedding in the plan); budget +5% -> ppl <= 31.5
TRIALS = [
    (30.1, 55.0, 8, "uniform rtn 8b", False),   # 0 feasible, front
    (31.0, 30.0, 4, "uniform rtn 4b", False),   # 1 feasible, front
    (45.0, 23.0, 3, "uniform rtn 3b", False),   # 2 infeasible
    (31.4, 27.0, 4, None, False),               # 3 feasible, dominated by 9
    (30.5, 40.0, 6, None, False),               # 4 feasible, front
    (30.6, 45.0, 6, None, False),               # 5 feasible, dominated by 4
    (1.0e6, 20.0, 3, None, False),              # 6 infeasible (broken)
    (math.inf, 21.0, 3, None, False),           # 7 infeasible, cannot be plotted
    (33.0, 26.0, 4, None, False),               # 8 infeasible
    (31.2, 25.0, 4, None, True),                # 9 feasible, front, recommended (smallest feasible)
]
FEASIBLE = {0, 1, 3, 4, 5, 9}
FRONT = [9, 1, 4, 0]
PLOTTED_INFEASIBLE = {2, 6, 8}


# ---- building a study without a model -----------------------------------------------------------


def make_plan(bits: int, trial: int, embeddings: bool) -> dict:
    layers = {}
    for block in range(N_BLOCKS):
        for i, path in enumerate(LAYER_TYPES):
            b = bits if (block + i + trial) % 3 else (8 if bits < 8 else bits)   # a little mixing per layer
            layers[f"model.layers.{block}.{path}"] = {"method": "rtn", "sparsity": 0.0, "pattern": "unstructured",
                                                      "bits": b, "group_size": 128, "symmetric": False}
    if embeddings:
        layers["model.embed_tokens"] = {"method": "rtn", "sparsity": 0.0, "pattern": "unstructured", "bits": 8,
                                        "group_size": 128, "symmetric": False}
    return {"version": 1, "layers": layers, "embeddings": embeddings, "calibration": None}


def make_study(url: str, name: str, budgets: Budgets, trials=TRIALS, failed: int = 1,
               objectives: tuple[str, ...] = ("perplexity", "size_mb")) -> None:
    spec = StudySpec(model="tiny/none", space=SearchSpace.load("bits"), budgets=budgets, objectives=objectives)
    study = optuna.create_study(study_name=name, storage=url, directions=["minimize", "minimize"])
    study.set_user_attr(SPEC_ATTR, spec.to_dict())
    study.set_user_attr(HASH_ATTR, spec.digest())
    study.set_user_attr(DENSE_ATTR, {"perplexity": DENSE_PPL, "size_mb": DENSE_MB, "size_bytes": int(DENSE_MB * 1e6)})
    for number, (ppl, size, bits, uniform, embeddings) in enumerate(trials):
        increase = 100 * (ppl / DENSE_PPL - 1) if math.isfinite(ppl) else math.inf
        metrics = {"perplexity": ppl, "ppl_increase_pct": increase, "kl": 0.01 * (ppl - DENSE_PPL + 0.5) if math.isfinite(ppl) else math.inf,
                   "size_mb": size, "size_bytes": int(size * 1e6), "avg_bits": float(bits), "avg_sparsity": 0.0,
                   "seconds": 1.5}
        attrs = {"metrics": metrics, "plan": make_plan(bits, number, embeddings)}
        if uniform:
            attrs["uniform"] = uniform
        constraints = list(budgets.constraints(metrics, DENSE_PPL).values())
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, values=[min(metrics[o], 1e30) for o in objectives],
            params={}, distributions={},
            user_attrs=attrs, system_attrs={"constraints": constraints}))
    for _ in range(failed):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={},
                                                  user_attrs={"fail_reason": "RuntimeError: test"}))


def validation_fixture() -> dict:
    def sets(search, heldout, pycode):
        return {name: {"perplexity": DENSE_PPL * (1 + inc / 100), "ppl_increase_pct": inc,
                       "ppl_increase_ci": [inc - 1.1, inc + 1.1], "kl": 0.02 + inc / 100, "kl_ci": [0.01, 0.05 + inc / 100],
                       "windows": 8}
                for name, inc in (("search", search), ("heldout", heldout), ("pycode", pycode))}

    return {
        "version": 1, "level": 0.95,
        "sets": {"search": {"label": "wikitext2 test, windows 0-7 (search)"},
                 "heldout": {"label": "wikitext2 test, windows 8-23 (held-out)"},
                 "pycode": {"label": "python code <stdlib>"}},
        "dense": {"sets": {"heldout": {"perplexity": 70.1, "tokens": 4080, "windows": 16}},
                  "tasks": {"wikitext_lastword": {"metric": "acc", "value": 0.41, "stderr": 0.02, "n": 500}}},
        "trials": {
            "9": {"sets": sets(4.0, 5.6, 9.0),
                  "tasks": {"wikitext_lastword": {"metric": "acc", "value": 0.39, "stderr": 0.02, "n": 500, "drop_points": 2.0}},
                  "verdict": {"search_feasible": True, "heldout_feasible": False, "flagged": True,
                              "reasons": ["held-out perplexity +5.6% breaks the +5% budget that the search met (+4.0%) "
                                          + EVIL]}},
            "1": {"sets": sets(3.3, 3.0, 4.0),
                  "tasks": {"wikitext_lastword": {"metric": "acc", "value": 0.405, "stderr": 0.02, "n": 500, "drop_points": 0.5}},
                  "verdict": {"search_feasible": True, "heldout_feasible": True, "flagged": False, "reasons": []}},
        },
    }


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('report') / 'study.db'}"
    make_study(url, "mixed " + EVIL, Budgets(max_ppl_increase_pct=5.0))
    make_study(url, "hopeless", Budgets(max_ppl_increase_pct=0.1), trials=TRIALS[2:5], failed=0)
    make_study(url, "by-kl", Budgets(max_kl=0.02), objectives=("kl", "size_mb"))
    return url


def read_study(url: str, name: str):
    records = load_records(url, name)
    front = pareto_front(records)
    return records, front, recommend(records)


@pytest.fixture(scope="module")
def report(storage, tmp_path_factory) -> dict[str, Path]:
    records, front, recommended = read_study(storage, "mixed " + EVIL)
    return write_report(records, front, recommended, validation_fixture(), tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def plain_report(storage, tmp_path_factory) -> dict[str, Path]:
    records, front, recommended = read_study(storage, "mixed " + EVIL)
    return write_report(records, front, recommended, None, tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def hopeless_report(storage, tmp_path_factory) -> dict[str, Path]:
    records, front, recommended = read_study(storage, "hopeless")
    assert front == [] and recommended is None
    return write_report(records, front, recommended, None, tmp_path_factory.mktemp("hopeless"))


# ---- the study reads back as built ---------------------------------------------------------------


def test_fixture_study_reads_back(storage):
    records, front, recommended = read_study(storage, "mixed " + EVIL)
    assert len(records.records) == len(TRIALS) and records.n_failed == 1
    assert {r.trial for r in records.records if r.feasible} == FEASIBLE
    assert [r.trial for r in front] == FRONT
    assert recommended is not None and recommended.trial == 9


# ---- files ----------------------------------------------------------------------------------------


def test_all_files_are_written(report):
    expected = {"report.html", "front.png", "heatmap.png", "history.png", "trials.csv", "front.json",
                "validation.csv", "validation.json"}
    assert set(report) == expected
    for name, path in report.items():
        assert path.name == name and path.is_file() and path.stat().st_size > 0, name
    for name in ("front.png", "heatmap.png", "history.png"):
        assert report[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trials_csv_has_one_row_per_completed_trial(report):
    with report["trials.csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["trial"]) for r in rows] == list(range(len(TRIALS)))   # the failed trial is not there
    assert {int(r["trial"]) for r in rows if r["feasible"] == "True"} == FEASIBLE
    assert {int(r["trial"]) for r in rows if r["on_front"] == "True"} == set(FRONT)
    assert [int(r["trial"]) for r in rows if r["recommended"] == "True"] == [9]
    assert rows[1]["uniform"] == "uniform rtn 4b" and rows[3]["uniform"] == ""
    assert float(rows[4]["perplexity"]) == 30.5 and float(rows[4]["size_mb"]) == 40.0
    assert {"kl", "avg_bits", "avg_sparsity", "seconds", "ppl_increase_pct"} <= set(rows[0])
    assert rows[7]["perplexity"] == "inf"


def test_front_json_holds_the_front_with_plans(report):
    doc = json.loads(report["front.json"].read_text())   # strict JSON: no Infinity
    assert [p["trial"] for p in doc["front"]] == FRONT
    assert doc["recommended"] == 9 and doc["feasible"] == len(FEASIBLE) and doc["failed"] == 1
    assert doc["front"][0]["plan"]["layers"]["model.embed_tokens"]["bits"] == 8
    assert doc["budgets"]["max_ppl_increase_pct"] == 5.0


def test_validation_files(report):
    with report["validation.csv"].open() as fh:
        rows = {int(r["trial"]): r for r in csv.DictReader(fh)}
    assert set(rows) == {1, 9}
    assert rows[9]["flagged"] == "True" and rows[1]["flagged"] == "False"
    assert float(rows[9]["heldout_ppl_increase_pct"]) == 5.6
    assert float(rows[9]["heldout_ppl_increase_ci_high"]) == pytest.approx(6.7)
    assert float(rows[9]["wikitext_lastword_drop_points"]) == 2.0
    assert json.loads(report["validation.json"].read_text())["trials"]["9"]["verdict"]["flagged"] is True


def test_page_escapes_study_text_and_is_self_contained(report):
    page = report["report.html"].read_text()
    assert EVIL not in page   # the study name and a verdict reason carry it
    assert "&lt;img src=x onerror=" in page
    assert "<script src=" not in page and "<link " not in page   # plotly.js is inlined, nothing is fetched
    assert len(page) > 1_000_000


def test_validation_table_marks_the_flagged_trial(report):
    page = report["report.html"].read_text()
    assert 'id="validation-table"' in page
    assert '<tr data-trial="9" data-flagged="true" class="recommended flagged">' in page
    assert '<tr data-trial="1" data-flagged="false">' in page
    assert "+5.6% [+4.5, +6.7]" in page           # held-out increase with its CI
    assert "python code &lt;stdlib&gt;" in page    # an extra set, escaped
    assert "acc 0.39 ± 0.02 (-2.0 pts)" in page
    assert "FLAGGED: held-out perplexity +5.6% breaks" in page
    assert 'class="box warn" id="recommendation"' in page


def test_page_without_validation_has_a_front_table(plain_report):
    assert "validation.csv" not in plain_report
    page = plain_report["report.html"].read_text()
    assert 'id="validation-table"' not in page and 'id="front-table"' in page
    for trial in FRONT:
        assert f'<tr data-trial="{trial}" ' in page


def test_study_without_feasible_trials_still_renders(hopeless_report):
    assert "heatmap.png" not in hopeless_report
    assert {"report.html", "front.png", "history.png", "trials.csv", "front.json"} <= set(hopeless_report)
    page = hopeless_report["report.html"].read_text()
    assert "No completed trial meets the budgets" in page and 'id="front-empty"' in page
    assert json.loads(hopeless_report["front.json"].read_text())["front"] == []


def test_kl_study_plots_kl_and_held_out_kl(storage):
    records, front, recommended = read_study(storage, "by-kl")
    assert {r.trial for r in records.records if r.feasible} == FEASIBLE and recommended.trial == 9
    fig = front_figure(build_report_data(records, front, recommended, validation_fixture()))
    traces = {t.name: t for t in fig.data}
    feasible = traces["feasible"]
    assert dict(zip(feasible.customdata, feasible.y)) == {r.trial: r.metrics["kl"] for r in records.records if r.feasible}
    assert list(traces["budget: KL &lt;= 0.02"].y) == [0.02, 0.02]   # names are HTML for plotly
    heldout = dict(zip(traces["held-out (validation)"].customdata, traces["held-out (validation)"].y))
    assert heldout == {1: pytest.approx(0.05), 9: pytest.approx(0.076)}
    assert fig.layout.yaxis.title.text == "KL to dense (nats/token)"


def test_bad_inputs_are_named_errors(storage, tmp_path):
    records, front, recommended = read_study(storage, "hopeless")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(ReportError, match="report folder"):
        write_report(records, front, recommended, None, blocked / "out")
    with pytest.raises(ReportError, match="version"):
        write_report(records, front, recommended, {"version": 2, "trials": {}}, tmp_path / "out")
    with pytest.raises(ReportError, match="not a trial number"):
        write_report(records, front, recommended, {"version": 1, "trials": {"x": {}}}, tmp_path / "out")


# ---- the heatmap and its menu ---------------------------------------------------------------------


def test_layer_grid_rows_blocks_and_non_block_row():
    grid = layer_grid(make_plan(4, 0, embeddings=True))
    assert grid.rows == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "model.embed_tokens")
    assert grid.columns == ("0", "1", "2", "3", NON_BLOCK)
    bits = grid.values("bits")
    assert bits[-1] == [None] * N_BLOCKS + [8.0]
    assert bits[0][0] == 8.0 and bits[0][1] == 4.0   # (block + i + trial) % 3 == 0 -> 8 bits
    assert all(v is None for v in [row[-1] for row in bits[:-1]])


def test_heatmap_menu_has_one_entry_per_front_config(storage):
    records, front, recommended = read_study(storage, "mixed " + EVIL)
    fig = heatmap_figure(build_report_data(records, front, recommended, None))
    menu = fig.layout.updatemenus[0]
    assert len(menu.buttons) == len(FRONT)
    assert menu.active == FRONT.index(9) and "recommended" in menu.buttons[menu.active].label
    fig = heatmap_figure(build_report_data(records, front, recommended, None, selected=[5, 9]))
    assert list(fig.layout.meta["configs"]) == [*FRONT, 5]
    with pytest.raises(TrialNotFoundError):
        build_report_data(records, front, recommended, None, selected=[99])


# ---- the page in a browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    required = os.environ.get("AUTOCOMP_REQUIRE_BROWSER") == "1"
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright (python) is not installed: pip install playwright"
        sync_playwright = None
    if reason is None and not Path(CHROMIUM).is_file():
        reason = f"no Chromium at {CHROMIUM}: apt-get install chromium"
    if reason is not None:
        if required:
            pytest.fail(f"AUTOCOMP_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, path: Path, menu_entry: int | None = None) -> tuple[dict, list[str], list[str]]:
    """Load the page (and pick entry ``menu_entry`` of the heatmap menu); return the plot data by div
    id, script errors and any network request."""
    page = browser.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    page.on("dialog", lambda dialog: (errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.on("request", lambda req: requests.append(req.url) if not req.url.startswith(("file:", "data:", "blob:")) else None)
    try:
        page.goto(path.resolve().as_uri(), wait_until="load")
        page.wait_for_function("() => window.Plotly !== undefined && document.querySelectorAll('.js-plotly-plot').length > 0")
        if menu_entry is not None:   # a real click on the dropdown, then on one of its entries
            page.locator(f"#{HEATMAP_DIV} .updatemenu-header-group").click()
            page.locator(f"#{HEATMAP_DIV} .updatemenu-dropdown-button").nth(menu_entry).click()
        plots = page.evaluate("""() => {
            const out = {};
            for (const div of document.querySelectorAll('.plotly-graph-div')) {
                out[div.id] = {
                    traces: (div.data || []).map(t => ({name: t.name, customdata: Array.from(t.customdata || [])})),
                    buttons: ((div.layout.updatemenus || [])[0] || {buttons: []}).buttons.length,
                    title: (div.layout.title || {}).text || "",
                    first_row: div.data.length && div.data[0].type === "heatmap" ? Array.from(div.data[0].text[0]) : null,
                };
            }
            out.__xss = window.__xss || 0;
            return out;
        }""")
    finally:
        page.close()
    return plots, errors, requests


def trace(plots: dict, div: str, name: str) -> list:
    matches = [t for t in plots[div]["traces"] if t["name"] == name]
    assert len(matches) == 1, f"{div}: no single trace named {name!r} in {[t['name'] for t in plots[div]['traces']]}"
    return matches[0]["customdata"]


def test_page_renders_in_chromium_with_every_trial(browser, report):
    plots, errors, requests = open_page(browser, report["report.html"])
    assert errors == [] and requests == [] and plots["__xss"] == 0
    assert {"front-plot", "heatmap-plot", "history-plot", "validation-plot"} <= set(plots)
    assert sorted(trace(plots, "front-plot", "feasible")) == sorted(FEASIBLE)
    assert sorted(trace(plots, "front-plot", "infeasible")) == sorted(PLOTTED_INFEASIBLE)
    assert trace(plots, "front-plot", "Pareto front") == FRONT
    assert trace(plots, "front-plot", "recommended") == [9]
    assert sorted(trace(plots, "front-plot", "uniform baselines")) == [0, 1, 2]
    assert sorted(trace(plots, "front-plot", "held-out (validation)")) == [1, 9]
    assert sorted(trace(plots, "history-plot", "feasible")) == sorted(FEASIBLE)
    assert plots["heatmap-plot"]["buttons"] == len(FRONT)
    assert plots["heatmap-plot"]["title"].startswith("per-layer plan: trial 9 ")
    assert plots["heatmap-plot"]["first_row"] == ["8", "4", "4", "8", ""]   # q_proj of trial 9; embedding column empty


def test_heatmap_menu_switches_the_config_in_chromium(browser, report):
    plots, errors, _ = open_page(browser, report["report.html"], menu_entry=len(FRONT) - 1)
    assert errors == []
    assert plots["heatmap-plot"]["title"].startswith(f"per-layer plan: trial {FRONT[-1]} ")
    assert plots["heatmap-plot"]["first_row"] == ["8", "8", "8", "8", ""]   # trial 0 is uniform 8-bit


def test_page_without_feasible_trials_renders_in_chromium(browser, hopeless_report):
    plots, errors, requests = open_page(browser, hopeless_report["report.html"])
    assert errors == [] and requests == []
    assert "heatmap-plot" not in plots
    assert trace(plots, "front-plot", "feasible") == []
    assert sorted(trace(plots, "front-plot", "infeasible")) == [0, 1, 2]


# ---- the dashboard --------------------------------------------------------------------------------


def test_dashboard_without_optuna_dashboard_is_a_dependency_error(storage, monkeypatch):
    from autocomp.reporting.dashboard import run_dashboard

    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)   # import fails as if not installed
    with pytest.raises(DependencyError, match="pip install optuna-dashboard"):
        run_dashboard(storage)


def test_dashboard_with_a_bad_storage_is_a_storage_error(tmp_path):
    pytest.importorskip("optuna_dashboard")
    from autocomp.reporting.dashboard import run_dashboard

    with pytest.raises(StorageError):
        run_dashboard(f"sqlite:///{tmp_path / 'missing.db'}")
    with pytest.raises(StorageError):
        run_dashboard("redis://localhost/0")


def test_dashboard_on_a_taken_port_is_a_named_error(storage):
    pytest.importorskip("optuna_dashboard")
    from autocomp.reporting.dashboard import run_dashboard

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ReportError, match="choose another --port"):
            run_dashboard(storage, port=taken.getsockname()[1])


def test_dashboard_serves_the_studies(storage, tmp_path):
    pytest.importorskip("optuna_dashboard")
    port = free_port()
    code = "import sys; from autocomp.reporting.dashboard import run_dashboard; run_dashboard(sys.argv[1], port=int(sys.argv[2]))"
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", code, storage, str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as resp:
                    body = json.loads(resp.read())
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert body is not None, f"dashboard did not answer (exit code {proc.poll()}): {(tmp_path / 'dashboard.log').read_text()}"
        names = {s["study_name"] for s in body["study_summaries"]}
        assert names == {"mixed " + EVIL, "hopeless", "by-kl"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()

