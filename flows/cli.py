"""The `kaizen` console script: one entry point, one subcommand per pipeline stage.

Each subcommand is implemented next to the code it drives (a `cli_*` function taking argv and
returning an exit code) and imported only when called, so `kaizen exec` does not pay for
importing torch or Prefect.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from types import FrameType

# name -> (implementation "module:function", one-line summary for `kaizen --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "exec": ("search.sandbox:cli_exec", "run a program (stdin) in the code sandbox; prints JSON"),
    "grade": ("search.grading:cli_grade", "grade predicted answers against references"),
    "tiny-model": ("models.tiny:cli_tiny_model", "build a tiny tokenizer + causal LM locally (no hub)"),
    "vllm": ("models.vllm_server:cli_vllm", "install, serve or check the vLLM server used for rollouts"),
    "rollout": ("models.rollout:cli_rollout", "run MCTS rollouts over problems; writes the nodes table"),
    "mine": ("data_store.mining:cli_mine", "mine PPM preference pairs and SFT data from nodes tables"),
    "train": ("models.training_cli:cli_train", "train the policy (sft), the process preference model (ppm), or the policy with GRPO (rl)"),
    "score": ("models.ppm:cli_score", "score texts with a PPM checkpoint"),
    "eval": ("models.evaluation:cli_eval", "evaluate a checkpoint on benchmarks (greedy, maj@K, ppm@K, mcts); writes the eval table"),
    "check-recipe": ("models.recipe:cli_check_recipe", "check recipes (the deploy build step runs this)"),
    "run": ("flows.commands:cli_run", "run gated self-evolution rounds of a recipe (the evolve flow)"),
    "round": ("flows.commands:cli_round", "run one round of a recipe (the round flow); re-running resumes it"),
    "stage": ("flows.commands:cli_stage", "re-run one stage of a round; later stages become stale"),
    "status": ("models.status:cli_status", "where a run stands: who holds it, rounds, stages done, what can resume"),
    "evaluate": ("flows.commands:cli_evaluate", "evaluate a checkpoint through the evaluate flow"),
    "demo": ("flows.demo:cli_demo", "the embedded CPU default: bootstrap a tiny model, then search-and-train rounds"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: kaizen <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`kaizen <command> --help` shows a command's options."]
    return "\n".join(lines)


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, so that no `except Exception` on the way swallows it."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kaizen: error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[name][0].split(":")
    command = getattr(importlib.import_module(module_name), function_name)
    # Python's default SIGTERM action ends the process at once: no `finally`, no atexit, so
    # Prefect's ephemeral server and training or vLLM subprocesses outlived a terminated run.
    # Unwinding instead runs every cleanup. (Prefect's flow engine swaps in its own handler while
    # a flow runs, marks the run crashed, then re-sends the signal here.)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(command(rest) or 0)
    except KeyboardInterrupt:
        print(f"kaizen {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kaizen status | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141
    except Terminated:
        print(f"kaizen {name}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as error:
        # Users get one line; KAIZEN_DEBUG=1 shows the traceback for bug reports.
        if os.environ.get("KAIZEN_DEBUG"):
            raise
        print(f"kaizen {name}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
