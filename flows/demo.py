"""`kaizen demo`: the embedded CPU default, gated self-evolution rounds of a tiny model on 2 cores.

It runs the `evolve` flow, the same Prefect flow a GPU deployment runs, on the `demo` recipe
(deployments/recipes/demo.yaml): round 0 builds a tiny causal LM locally and fine-tunes it on a
programmatic teacher's solutions of the curriculum's easiest level (rStar-Math's bootstrap); rounds
1-4 search the training problems with MCTS (terminal-guided in rounds 1-2, PPM-augmented from
round 3), mine pairs and SFT trajectories, retrain the policy and the PPM, evaluate on the
held-out split (greedy, maj@8, PPM best-of-8) and gate. Only the recipe's sizes are the demo's.

At the end: a table per round on the terminal, `{home}/summary.json` and `{home}/report.html`.
Running it again resumes: finished stages come from Prefect's cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_store.home import Layout, get_home
from data_store.parquet import check_output_directory, write_json
from search.arguments import OneLineParser

if TYPE_CHECKING:
    from models.recipe import Recipe

DEFAULT_RECIPE = "demo"
SUMMARY_COLUMNS = (
    ("round", "round", "{}"), ("greedy", "greedy_accuracy", "{:.2f}"), ("maj@8", "maj8_accuracy", "{:.2f}"),
    ("ppm@8", "ppm8_accuracy", "{:.2f}"), ("solved", "solved_share", "{:.2f}"), ("pairs", "pairs", "{}"),
    ("sft", "sft_examples", "{}"), ("gate", "gate_passed", "{}"), ("wall_s", "wall_s", "{:.0f}"),
)


def summary_table(rows: list[dict]) -> str:
    """The per-round figures as aligned text columns ('-' where a round has no such figure)."""
    def cell(row: dict, key: str, form: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "pass" if value else "FAIL"
        return form.format(value)

    widths = [max([len(title), *(len(cell(row, key, form)) for row in rows)]) for title, key, form in SUMMARY_COLUMNS]
    lines = ["  ".join(title.rjust(width) for (title, _, _), width in zip(SUMMARY_COLUMNS, widths))]
    for row in rows:
        lines.append("  ".join(cell(row, key, form).rjust(width) for (_, key, form), width in zip(SUMMARY_COLUMNS, widths)))
    return "\n".join(lines)


def cli_demo(argv: list[str]) -> int:
    parser = OneLineParser(prog="kaizen demo", description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $KAIZEN_HOME or ./kaizen_home)")
    parser.add_argument("--rounds", type=int, default=4, help="search rounds after the bootstrap round 0 (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the curriculum, model and search (default: the recipe's)")
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe name or YAML path (default: demo)")
    args = parser.parse_args(argv)
    if args.rounds < 0:
        parser.error("--rounds must be >= 0")

    from models.pipeline import Pipeline
    from models.recipe import load_recipe

    overrides = {"seed": args.seed} if args.seed is not None else None
    recipe = load_recipe(args.recipe, overrides)
    home = check_output_directory(get_home(args.home), "data home")
    layout = Layout(home)
    Pipeline(recipe, layout).check_problems()  # a bad problems file fails here, in one line
    with layout.hold_run(recipe.run, "kaizen demo"):  # a busy run fails here, before Prefect starts
        return _run_demo(args, recipe, overrides, layout)


def _run_demo(args: argparse.Namespace, recipe: Recipe, overrides: dict[str, Any] | None, layout: Layout) -> int:
    from flows.commands import quiet_prefect, failure_message
    from flows.evolve import evolve_flow
    from models.report import summary_rows, write_run_report

    home = layout.home
    quiet_prefect()
    started = time.monotonic()
    state = evolve_flow(args.recipe, 0, args.rounds, str(home), overrides, return_state=True)
    total_wall_s = time.monotonic() - started

    # An earlier demo in the same home may have left rounds this run did not make: past --rounds, or
    # past a round whose outcome changed here (those are stale now, and the report leaves them out).
    rows = summary_rows(layout, recipe.run, benchmark=recipe.gate.benchmark, through_round=args.rounds)
    if not rows:  # not even round 0 finished: no summary or report of a run that did not happen
        print(f"kaizen demo: error: {failure_message(state)}", file=sys.stderr)
        return 1
    summary_path = home / "summary.json"
    write_json(summary_path, {"rounds": rows, "total_wall_s": total_wall_s}, indent=2)
    report = write_run_report(layout, recipe.run, out=home / "report.html", through_round=args.rounds)
    print(summary_table(rows))
    print(f"total {total_wall_s / 60:.1f} min; summary -> {summary_path}; report -> {report}")
    if not state.is_completed():
        print(f"kaizen demo: evolution stopped: {failure_message(state)}", file=sys.stderr)
        return 1
    return 0

