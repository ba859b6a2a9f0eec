"""Commands that read a stored study: ``pareto``, ``recommend``, ``validate`` (re-scores the front
and stores the figures), ``report`` and ``dashboard``."""

from __future__ import annotations

import argparse
import sys

from autocomp.cli import options
from autocomp.jsonsafe import dumps
from autocomp.cli.printing import print_front, print_recommendation, recommendation_json, stderr

EXIT_NOTHING_FEASIBLE = 3


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pareto", help="print the feasible Pareto set of a study")
    options.add_study(p, required=True)
    options.add_budgets(p)
    p.add_argument("--json", action="store_true", help="print JSON (a list of {trial, metrics, plan, ...})")
    p.set_defaults(func=run_pareto)

    r = subparsers.add_parser("recommend", help="choose one configuration under (new) budgets from stored trials")
    options.add_study(r, required=True)
    options.add_budgets(r)
    r.add_argument("--prefer", default="auto", choices=["auto", "size", "quality", "knee"])
    r.add_argument("--by", default="auto", choices=["auto", "heldout", "search"],
                   help="choose by held-out figures (needs autocomp validate) or by search figures; "
                        "auto: held-out when the study was validated")
    r.add_argument("--max-acc-drop", action="append", default=[], metavar="TASK=PTS",
                   help="accuracy budget on a validated task; repeatable")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=run_recommend)

    v = subparsers.add_parser("validate", help="re-score a study's front on held-out windows, extra domains and "
                                               "lm-eval tasks")
    options.add_study(v, required=True)
    options.add_budgets(v)
    options.add_validation(v, in_search=False)
    v.add_argument("--trials", default=None, metavar="N,M", help="trials to validate (default: the fronts and baselines)")
    options.add_no_progress(v, help=None)
    v.add_argument("--json", action="store_true", help="print the stored validation as JSON")
    v.set_defaults(func=run_validate)

    rp = subparsers.add_parser("report", help="write an HTML report (plotly), PNG figures and CSV/JSON data of a study")
    options.add_study(rp, required=True)
    rp.add_argument("--out", required=True, help="output folder")
    rp.set_defaults(func=run_report)

    d = subparsers.add_parser("dashboard", help="open optuna-dashboard on a study storage")
    d.add_argument("--storage", required=True)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=8080)
    d.set_defaults(func=run_dashboard)


def show_recommendation(storage: str, study_name: str, budgets, prefer: str, acc_budgets: dict[str, float] | None,
                        by: str, json_out: bool, with_export_hint: bool = False) -> int:
    """Print :func:`autocomp.api.recommendation` (text or JSON); the exit code: 0, or
    :data:`EXIT_NOTHING_FEASIBLE`. ``budgets`` / ``acc_budgets`` None: the study's own and those
    stored with its validation."""
    from autocomp import api

    rec = api.recommendation(storage, study_name, budgets, acc_budgets, prefer, by)
    if json_out:
        print(dumps(recommendation_json(rec), indent=2))
    else:
        print_recommendation(rec, storage, study_name, with_export_hint)
    return 0 if rec.best is not None else EXIT_NOTHING_FEASIBLE


def run_pareto(args: argparse.Namespace) -> int:
    from autocomp import api

    print_front(api.pareto(args.storage, args.study_name, options.budgets(args)), args.json)
    return 0


def run_recommend(args: argparse.Namespace) -> int:
    from autocomp.validation.lmeval import parse_acc_budgets

    return show_recommendation(args.storage, args.study_name, options.budgets(args), args.prefer,
                               parse_acc_budgets(args.max_acc_drop) or None, args.by, args.json)


def _trial_numbers(text: str | None) -> tuple[int, ...] | None:
    from autocomp.errors import StudyError

    try:
        return None if text is None else tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise StudyError(f"--trials takes comma-separated trial numbers, got {text!r}") from None


def run_validate(args: argparse.Namespace) -> int:
    """Validate, then print the stored validation (``--json``) or the recommendation by held-out figures."""
    from autocomp import api

    config = options.validation_config(args, _trial_numbers(args.trials))
    validation = api.validate(args.storage, args.study_name, config, options.budgets(args),
                              progress=not args.no_progress, echo=stderr)
    if args.json:
        print(dumps(validation, indent=2))
        return 0
    return show_recommendation(args.storage, args.study_name, options.budgets(args), "auto", config.acc_budgets,
                               "heldout", False, with_export_hint=True)


def run_report(args: argparse.Namespace) -> int:
    from autocomp import api

    paths = api.report(args.storage, args.study_name, args.out)
    for kind, path in paths.items():
        print(f"{kind:>14}: {path}")
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    from autocomp import api

    print(f"optuna-dashboard on http://{args.host}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr)
    api.dashboard(args.storage, args.host, args.port)
    return 0
