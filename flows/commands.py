"""The command lines of the flows: `kaizen run`, `kaizen round`, `kaizen stage`, `kaizen evaluate`.

Apart from `flows.evolve` so that `--help` and usage errors answer at once: the flows import Prefect,
torch and transformers (over ten seconds on a small machine), and only a command that runs a flow
needs them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any

from data_store.home import STAGES
from search.arguments import OneLineParser

if TYPE_CHECKING:
    from models.pipeline import Pipeline


def _override(text: str) -> tuple[str, Any]:
    import yaml

    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE (e.g. search.mcts.rollouts=16), got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise argparse.ArgumentTypeError(f"--set {key}: {value!r} is not a YAML value ({problem})") from None


def _override_text(key: str, value: Any) -> str:
    """`KEY=VALUE` that `_override` reads back as `value` (None is `null` there, not `None`)."""
    import yaml

    try:
        plain = isinstance(value, str) and yaml.safe_load(value) == value
    except yaml.YAMLError:
        plain = False
    if plain:
        return f"{key}={value}"
    # One line of YAML in flow style (null, true, 1.0e-05, .inf, quoted text, [..], {..}), without the
    # end-of-document marker a lone scalar gets.
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipe name (deployments/recipes) or YAML path")
    parser.add_argument("--home", default=None, help="data home (default: $KAIZEN_HOME or ./kaizen_home)")
    parser.add_argument("--set", dest="overrides", type=_override, action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field by dotted name (repeatable), e.g. --set search.shards=4")


def _checked(args: argparse.Namespace) -> tuple[dict[str, Any] | None, Pipeline]:
    """The overrides as a dict and the pipeline they give, whose recipe, problems file and home are
    checked on the way (bad input fails in one line before Prefect starts)."""
    from flows.evolve import open_pipeline  # noqa: PLC0415 - see the module docstring

    overrides = dict(args.overrides) or None
    pipeline = open_pipeline(args.recipe, args.home, overrides)
    pipeline.check_problems()
    quiet_prefect()
    return overrides, pipeline


def quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _parse_rounds(text: str) -> tuple[int | None, int]:
    """START:END, or END alone (as `kaizen demo --rounds N`): from the round after the promoted one to END."""
    start, colon, end = text.partition(":")
    if not colon:
        start, end = "", start
    try:
        first, last = (int(start) if start else None), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rounds must look like START:END or END, got {text!r}") from None
    if first is not None and not 0 <= first <= last:
        raise argparse.ArgumentTypeError(f"--rounds START:END needs 0 <= START <= END, got {text!r}")
    return first, last


def cli_run(argv: list[str]) -> int:
    parser = OneLineParser(prog="kaizen run", description="Run the evolve flow: gated rounds of a recipe.")
    _common(parser)
    parser.add_argument("--rounds", type=_parse_rounds, default=(None, 4),
                        help="START:END, or END: from the round after the promoted one to END (default 4)")
    args = parser.parse_args(argv)
    overrides, pipeline = _checked(args)
    from flows.evolve import check_round, evolve_flow  # noqa: PLC0415

    start, end = args.rounds
    first = pipeline.next_round() if start is None else start
    if first > end:
        print(f"nothing to run: rounds up to {end} of run {pipeline.run!r} are already promoted")
        return 0
    check_round(pipeline, first)
    with pipeline.layout.hold_run(pipeline.run, "kaizen run"):  # a busy run fails here, before Prefect starts
        state = evolve_flow(args.recipe, start, end, args.home, overrides, return_state=True)
    return _report_state(state, parser.prog)


def cli_round(argv: list[str]) -> int:
    parser = OneLineParser(prog="kaizen round", description="Run the round flow once.")
    _common(parser)
    parser.add_argument("--round", dest="round_number", type=int, default=None,
                        help="round number (default: the one after the promoted round)")
    args = parser.parse_args(argv)
    overrides, pipeline = _checked(args)
    from flows.evolve import check_round, round_flow  # noqa: PLC0415

    check_round(pipeline, pipeline.next_round() if args.round_number is None else args.round_number)
    with pipeline.layout.hold_run(pipeline.run, "kaizen round"):
        state = round_flow(args.recipe, args.round_number, args.home, overrides, return_state=True)
    return _report_state(state, parser.prog)


def cli_stage(argv: list[str]) -> int:
    parser = OneLineParser(prog="kaizen stage", description="Re-run one stage of a round.")
    parser.add_argument("stage", choices=STAGES, help="the stage to re-run")
    _common(parser)
    parser.add_argument("--round", dest="round_number", type=int, required=True)
    args = parser.parse_args(argv)
    overrides, pipeline = _checked(args)
    from flows.evolve import check_stage, stage_flow  # noqa: PLC0415

    check_stage(pipeline, args.stage, args.round_number)
    with pipeline.layout.hold_run(pipeline.run, f"kaizen stage {args.stage}"):
        state = stage_flow(args.recipe, args.stage, args.round_number, args.home, overrides, return_state=True)
    if state.is_completed():
        stale = state.result()
        again = ["kaizen", "round", "--recipe", args.recipe, "--round", str(args.round_number)]
        again += ["--home", args.home] if args.home else []
        again += [word for key, value in args.overrides for word in ("--set", _override_text(key, value))]
        print(f"re-ran {args.stage} of round {args.round_number}; now stale: {', '.join(stale)} "
              f"({shlex.join(again)} brings them up to date)")
    return _report_state(state, parser.prog)


def cli_evaluate(argv: list[str]) -> int:
    from models.evaluation import add_checkpoint_arguments, check_checkpoint_sources, checked_evaluation, search_options

    parser = OneLineParser(prog="kaizen evaluate", description="Run the evaluate flow on a checkpoint.")
    add_checkpoint_arguments(parser)
    parser.add_argument("--out", default=None, help="also write eval.parquet and summary.json here")
    args = parser.parse_args(argv)
    from data_store.parquet import check_output_directory

    # Bad input in one line (usage errors, exit 2), not in a failed flow run's log; the flow loads the
    # benchmark files again, where a deployment's run needs them.
    try:
        checked_evaluation(args)
        if args.out:
            check_output_directory(args.out)
    except ValueError as err:
        parser.error(str(err))
    check_checkpoint_sources(args.model, args.ppm)
    from flows.evolve import evaluate_flow  # noqa: PLC0415

    quiet_prefect()
    state = evaluate_flow(args.model, args.benchmarks, args.modes, args.ppm, args.limit, args.out, args.backend,
                          args.seed, args.step_format, **search_options(args), return_state=True)
    if state.is_completed():
        for row in state.result():
            print(json.dumps(row))
    return _report_state(state, parser.prog)


def failure_message(state: Any) -> str:
    """The first line of what a flow run that did not complete raised."""
    try:
        state.result()
    except BaseException as err:  # noqa: BLE001 - the flow's own exception, reported in one line
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"the flow run ended {state.type.value.lower()}"


def _report_state(state: Any, prog: str) -> int:
    """0 for a completed flow run; otherwise one line with the failure's message."""
    if state.is_completed():
        return 0
    print(f"{prog}: error: {failure_message(state)}", file=sys.stderr)
    return 1
