"""Benchmark: does a front chosen on the search windows hold on data the search never saw?

For a finished study (default: a copy of ``results/bench_mixed_gptq/study.db``, the 40-trial
mixed-precision GPTQ search on gemma3-270m), every validated trial (the fronts and the uniform
baselines) is re-scored on

* ``search``: the windows the search scored (a reproduction check as well),
* ``heldout``: the next windows of WikiText-2 test,
* ``pycode``: Python standard-library source (a second domain),
* ``wikitext_lastword``: last-word accuracy through lm-eval (LAMBADA-style, WikiText-2 test, second half),

each with a 95% paired bootstrap interval over windows. Then, for a grid of perplexity budgets,
it counts how many "meets the budget" verdicts of the search hold on held-out and second-domain
data. Writes ``results/bench_validation/{table.md,summary.json}`` and the study report (HTML, PNG).

    python scripts/bench_validation.py                       # about 25 minutes on 2 cores
    python scripts/bench_validation.py --task-limit 50       # quicker
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "bench_validation"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--storage", default=None, help="study storage (default: a copy of the bench_mixed_gptq study)")
    ap.add_argument("--study-name", default="mixed-gptq")
    ap.add_argument("--heldout-windows", type=int, default=16)
    ap.add_argument("--extra-windows", type=int, default=16)
    ap.add_argument("--tasks", default="wikitext_lastword")
    ap.add_argument("--task-limit", type=int, default=200)
    ap.add_argument("--budgets", default="2,5,10,20,50,100,200", help="perplexity-increase budgets (%%) to judge")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import torch

    from autocomp import api
    from autocomp.front import pareto_front, recommend
    from autocomp.store.records import load_records
    from autocomp.config.objectives import Budgets
    from autocomp.validation.runner import ValidationConfig
    from autocomp.validation.verdicts import recommend_validated, verdicts

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage
    if storage is None:
        db, source = out / "study.db", ROOT / "results" / "bench_mixed_gptq" / "study.db"
        if not db.exists():
            if not source.exists():
                print(f"bench_validation: {source} is missing (study files are not committed); run "
                      "scripts/bench_mixed_gptq.py first, or pass --storage/--study-name of a finished study",
                      file=sys.stderr)
                return 2
            shutil.copy(source, db)
        storage = f"sqlite:///{db}"
    tasks = tuple(t for t in args.tasks.split(",") if t)
    config = ValidationConfig(heldout_windows=args.heldout_windows, extra={"pycode": "pycode"},
                              extra_windows=args.extra_windows, tasks=tasks, task_limit=args.task_limit)
    t0 = time.perf_counter()
    validation = api.validate(storage, args.study_name, config, echo=lambda m: print(m, file=sys.stderr))
    seconds = time.perf_counter() - t0
    records = load_records(storage, args.study_name)
    front = {r.trial for r in pareto_front(records)}
    by_search = recommend(records)
    by_heldout, judged = recommend_validated(records, validation)
    sets = list(validation["sets"])
    compute = sum(e.get("seconds", 0.0) for e in validation["trials"].values())
    level = round(100 * validation["level"])

    def cell(figures: dict) -> str:
        low, high = figures["ppl_increase_ci"]
        return f"{figures['ppl_increase_pct']:+.1f}% [{low:+.1f}, {high:+.1f}]"

    def task_cell(result: dict) -> str:
        ci = result.get("drop_ci")
        return (f"{100 * result['value']:.1f} ({result['drop_points']:+.1f}"
                + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "") + ")")

    lines = [f"# bench_validation: {records.spec.model}, study {args.study_name!r} ({len(records.records)} trials, "
             f"space {records.spec.space.name})", "",
             "validation sets: " + "; ".join(f"**{n}** = {validation['sets'][n]['label']}" for n in sets), "",
             f"{len(validation['trials'])} trials validated (fronts and uniform baselines): {compute:.0f} s of trial "
             f"validation in all, {compute / len(validation['trials']):.0f} s per trial ({seconds:.0f} s this run); "
             f"perplexity increase vs the dense model on the same windows, {level}% paired bootstrap interval over "
             f"windows ({validation['replicates']} replicates)", ""]
    dense = validation["dense"]
    lines.append("dense: " + ", ".join(f"{n} ppl {dense['sets'][n]['perplexity']:.2f}" for n in sets)
                 + "".join(f", {t} acc {100 * r['value']:.1f}% (n={r['n']})" for t, r in dense["tasks"].items()))
    lines.append("")
    head = "| trial | size MB | " + " | ".join(f"{n} +ppl" for n in sets) + "".join(
        f" | {t} acc % (drop, points [CI])" for t in tasks)
    lines += [head + " | note |", "|" + " --- |" * (2 + len(sets) + len(tasks) + 1)]
    rows = []
    for key in sorted(validation["trials"], key=int):
        entry, number = validation["trials"][key], int(key)
        record = next(r for r in records.records if r.trial == number)
        note = [record.uniform or "", "front" if number in front else ""]
        if by_search is not None and number == by_search.trial:
            note.append("**recommended by search**")
        if by_heldout is not None and number == by_heldout.trial:
            note.append("**recommended by held-out**")
        task_cells = "".join(f" | {task_cell(entry['tasks'][t])}" for t in tasks)
        lines.append(f"| {number} | {entry['size_mb']:.1f} | " + " | ".join(cell(entry["sets"][n]) for n in sets)
                     + task_cells + f" | {', '.join(x for x in note if x)} |")
        rows.append({"trial": number, "size_mb": entry["size_mb"], "uniform": record.uniform,
                     "on_front": number in front, "sets": entry["sets"], "tasks": entry["tasks"],
                     "search_reproduced_rel": entry["search_reproduced_rel"]})

    # do the search's budget verdicts hold on held-out / second-domain data?
    grid = [float(b) for b in args.budgets.split(",")]
    lines += ["", "## Do the search's verdicts hold?", "",
              "For each perplexity budget: trials that meet it on the search windows, how many of those still meet it "
              "held out and on the second domain (flagged = met on search, broken held out), and how many verdicts "
              "(either way) agree.", "",
              "| budget | meet on search | hold held-out | flagged | hold on pycode | verdicts agreeing (held-out) |",
              "| --- | --- | --- | --- | --- | --- |"]
    agree_total = n_total = 0
    budget_rows = []
    for b in grid:
        budgets = Budgets(max_ppl_increase_pct=b)
        judged_b = verdicts(records, validation, budgets)
        met = [n for n, v in judged_b.items() if v["search_feasible"]]
        held = [n for n in met if judged_b[n]["heldout_feasible"]]
        code = [n for n in met if validation["trials"][str(n)]["sets"]["pycode"]["ppl_increase_pct"] <= b]
        agree = sum(v["search_feasible"] == v["heldout_feasible"] for v in judged_b.values())
        agree_total += agree
        n_total += len(judged_b)
        lines.append(f"| +{b:g}% | {len(met)} | {len(held)} | {len(met) - len(held)} | {len(code)} | "
                     f"{agree}/{len(judged_b)} |")
        budget_rows.append({"budget_pct": b, "met_on_search": met, "hold_heldout": held, "hold_pycode": code,
                            "agree": agree, "judged": len(judged_b)})
    share = agree_total / n_total if n_total else float("nan")
    lines += ["", f"verdicts that agree between search and held-out over the grid: {agree_total}/{n_total} "
                  f"({100 * share:.1f}%)"]
    flagged_study = [n for n, v in judged.items() if v["flagged"]]
    lines += [f"under the study's own budgets ({records.spec.budgets.describe()}): flagged trials "
              f"{flagged_study or 'none'}; recommended by search: trial {by_search.trial if by_search else '-'}, "
              f"by held-out: trial {by_heldout.trial if by_heldout else '-'}"]
    report = api.report(storage, args.study_name, out / "report")
    for kind in ("front.png", "heatmap.png", "history.png"):
        if (out / "report" / kind).exists():
            shutil.copy(out / "report" / kind, out / kind)
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({
        "storage": storage, "study": args.study_name, "seconds_this_run": seconds,
        "seconds_trial_validation": compute, "sets": validation["sets"],
        "dense": dense, "trials": rows, "budget_grid": budget_rows, "agreement_share": share,
        "recommended_by_search": by_search.trial if by_search else None,
        "recommended_by_heldout": by_heldout.trial if by_heldout else None,
        "report": {k: str(v) for k, v in report.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
