"""`kaizen train sft|ppm|rl`: train the policy, the PPM, or the policy with GRPO, from Parquet tables in a subprocess.

Kept apart from `models.training` so that `--help` and usage errors answer without importing
torch, transformers and TRL.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from search.arguments import OneLineParser

PROG = "kaizen train"


def _parse_setting(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (numbers, booleans, lists); argparse reports a bad one."""
    import yaml

    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"cannot read the value of {key!r}: {err}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG, description="Train the policy (sft), the process preference model (ppm), or the policy with GRPO (rl).")
    parser.add_argument("kind", choices=["sft", "ppm", "rl"],
                        help="sft: policy on `sft` tables; ppm: PPM on `pairs` tables; rl: GRPO on `rl_prompts` tables")
    parser.add_argument("--tables", nargs="+", type=Path, required=True, help="Parquet tables (all verified data so far)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to create")
    # Without a recipe the config classes' defaults apply; they are TRL's, written out here because `--help`
    # does not import TRL (tests/test_training.py checks them against the classes).
    parser.add_argument("--recipe", default=None,
                        help="recipe name (deployments/recipes) or YAML path; its `training` section is used. "
                             "Without --recipe, TRL's defaults apply: learning_rate 2e-5 (sft), 1e-4 (ppm), "
                             "1e-6 (rl); num_train_epochs 3; per_device_train_batch_size 8 (change them with --set)")
    parser.add_argument("--base-model", default=None, help="model to start from (default: the recipe's); for ppm, "
                        "this round's SFT checkpoint")
    parser.add_argument("--previous", type=Path, default=None,
                        help="last round's checkpoint to continue from; needs init_from: previous (in the recipe, "
                             "or --set init_from=previous)")
    parser.add_argument("--set", dest="settings", action="append", type=_parse_setting, default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set learning_rate=1e-5 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--timeout", type=float, default=None, help="kill the run after this many seconds")
    return parser


def cli_train(argv: list[str]) -> int:
    """Entry point of `kaizen train`; prints the checkpoint path on success."""
    args = build_parser().parse_args(argv)
    from data_store.parquet import check_output_directory
    from models.training import TrainingError, TrainingInputError, train_ppm, train_rl, train_sft

    try:
        check_output_directory(args.out)
    except ValueError as err:
        build_parser().error(str(err))

    options: dict[str, Any] = {"recipe": args.recipe, "base_model": args.base_model, "overrides": dict(args.settings),
                               "overwrite": args.overwrite, "timeout_s": args.timeout}
    if args.kind != "rl":
        options["previous_checkpoint"] = args.previous
    elif args.previous is not None:
        build_parser().error("--previous does not apply to rl (its start is --base-model, this round's SFT policy)")
    train = {"sft": train_sft, "ppm": train_ppm, "rl": train_rl}[args.kind]
    try:
        checkpoint = train(args.tables, args.out, **options)
    except TrainingError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, TrainingInputError) else 1
    print(checkpoint)
    return 0
