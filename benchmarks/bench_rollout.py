"""Rollout generation efficiency: tokens/s during MCTS against a plain batched generate, per backend.

    efficiency = (tokens generated during MCTS / MCTS wall time) / (tokens/s of a plain generate)

Both figures come from one generator in one process (the same loaded model, or the same managed
vLLM server), so backend, model and machine are the same. The plain generate sends as many
curriculum prompts as the search has problems in one call, with the search's n (width),
max_tokens, temperature and stop strings (`models.generation.measure_throughput`, median of three
calls). Every plain call gets problems of its own, never searched and never sent before: both
backends reuse the states of prompts they have prefilled (vLLM's prefix caching, the transformers
backend's `PrefixKVCache`), which a search gains from as its prompts extend one another, but a
plain generate of repeated prompts would be measuring the cache. It runs before every
search and after the last (after a discarded full-size warm-up); each search is compared with the
mean of the plain speeds just before and just after it, because the machine is shared and its
speed drifts. Issue 3 target: >= 0.7 for the transformers backend and a tiny model on this CPU.

The search is the product's: `run_rollouts` with the real Sandbox and Grader and the stage's
default pipeline groups. Two more columns say where a shortfall comes from: "in gen" is the share
of the search's wall time spent inside generate calls (the rest is the driver and waiting for
evaluation), and "gen tok/s" is the speed inside those calls (lower than plain because calls
shrink as trees finish, and deeper nodes have longer prompts).

The policy is a tiny model built from the curriculum corpus and, unless --sft-epochs 0, fine-tuned
on the teacher's easiest-level solutions so that its steps are mostly well-formed (the node kinds
are printed). Models are cached under --workdir (default: a temporary directory).

    .venv/bin/python benchmarks/bench_rollout.py [--backends hf vllm] [--problems 32] [--repeats 2]
        [--workdir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_store.curriculum import (  # noqa: E402
    EASIEST_LEVEL,
    bootstrap_sft_rows,
    curriculum_corpus,
    make_curriculum,
)
from models.backends import BackendConfig, open_generator  # noqa: E402
from models.generation import measure_throughput  # noqa: E402
from models.rollout import RolloutStageConfig  # noqa: E402
from search.mcts import MCTSConfig  # noqa: E402
from search.policy import Generator  # noqa: E402
from search.rollout import SEARCH_STOP, Problem, run_rollouts  # noqa: E402
from search.steps import render_prompt  # noqa: E402

TARGET = 0.7
TRAINING_RECIPE = Path(__file__).resolve().parents[1] / "deployments" / "recipes" / "demo.yaml"


def prepare_policy(workdir: Path, *, seed: int, sft_problems: int, sft_epochs: int) -> Path:
    """The tiny policy (built, and SFT'd unless sft_epochs is 0), reused when already in `workdir`."""
    import pyarrow as pa

    from data_store.parquet import write_table
    from models.tiny import build_tiny_model
    from models.training import train_sft

    base = workdir / f"tiny-seed{seed}"
    if not base.exists():
        print(f"building the tiny model in {base}", file=sys.stderr)
        build_tiny_model(base, corpus=curriculum_corpus(seed=seed), seed=seed)
    if sft_epochs == 0:
        return base
    policy = workdir / f"sft-seed{seed}-{sft_problems}x{sft_epochs}"
    if not policy.exists():
        # A seed of its own, so the SFT problems are not the ones the benchmark searches.
        teacher, _ = make_curriculum(sft_problems, 0, seed=seed + 1, levels=[EASIEST_LEVEL])
        table = write_table(pa.Table.from_pylist(bootstrap_sft_rows(teacher)), workdir / f"{policy.name}.parquet")
        print(f"fine-tuning on {sft_problems} teacher solutions for {sft_epochs} epochs -> {policy}", file=sys.stderr)
        train_sft([table], policy, recipe=TRAINING_RECIPE, base_model=str(base),
                  overrides={"num_train_epochs": sft_epochs, "logging_steps": 1000})
    return policy


@dataclass
class SearchRun:
    """One MCTS run against the plain generate speed around it."""

    backend: str
    repeat: int
    tokens: int
    wall_s: float
    generate_s: float
    generate_calls: int
    expansions: int
    node_kinds: dict[str, int]
    plain_before: float
    plain_after: float
    load_1min: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def plain_tokens_per_s(self) -> float:
        return (self.plain_before + self.plain_after) / 2

    @property
    def efficiency(self) -> float:
        return self.tokens_per_s / self.plain_tokens_per_s

    @property
    def in_generate(self) -> float:
        return self.generate_s / self.wall_s

    @property
    def generate_tokens_per_s(self) -> float:
        return self.tokens / self.generate_s


class FreshPrompts:
    """Prompt sets of curriculum problems (all levels), each set new: seeds no search or earlier set used."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seeds = itertools.count(seed + 1_000)

    def take(self, sets: int) -> list[list[str]]:
        return [[render_prompt(problem.problem) for problem in make_curriculum(self.size, 0, seed=next(self.seeds))[0]]
                for _ in range(sets)]


def plain_speed(generator: Generator, fresh: FreshPrompts, search: MCTSConfig) -> float:
    """Median tokens/s of three plain generate calls on new prompts (one call takes about a second here)."""
    return measure_throughput(generator, fresh.take(3), n=search.width, max_tokens=search.max_step_tokens,
                              temperature=search.temperature, stop=list(SEARCH_STOP)).tokens_per_s


def measure_backend(backend: str, model: Path, problems: Sequence[Problem], search: MCTSConfig,
                    repeats: int) -> list[SearchRun]:
    """Plain, search, plain, search, ..., plain: each search between two plain measurements."""
    from search.grading import Grader
    from search.sandbox import Sandbox

    stage = RolloutStageConfig(mcts=search)
    fresh = FreshPrompts(len(problems), search.seed)
    runs = []
    with (open_generator(model, BackendConfig(backend=backend), seed=search.seed) as generator,
          Sandbox(stage.sandbox) as sandbox, Grader(workers=stage.grader_workers) as grader):
        # Start the sandbox's heavy (sympy) workers now: startup is not what this measures.
        sandbox.run_many(["print(1)", "import sympy\nprint(sympy.Integer(1))"])
        plain_speed(generator, fresh, search)  # the first full-size calls are slower (allocation): not counted
        plain_before = plain_speed(generator, fresh, search)
        for repeat in range(repeats):
            print(f"{backend}: MCTS over {len(problems)} problems, run {repeat + 1} of {repeats}", file=sys.stderr)
            result = run_rollouts(problems, search, generator=generator, executor=sandbox, checker=grader,
                                  pipeline_groups=stage.pipeline_groups)
            load = os.getloadavg()[0]
            plain_after = plain_speed(generator, fresh, search)
            stats = result.stats
            kinds = Counter(node.kind.value for tree in result.trees for node in tree.nodes)
            runs.append(SearchRun(backend, repeat + 1, stats.tokens_generated, stats.wall_seconds,
                                  stats.generate_seconds, stats.generate_calls, stats.expansions, dict(kinds),
                                  plain_before, plain_after, round(load, 2)))
            plain_before = plain_after
    return runs


def print_report(runs: Sequence[SearchRun], pipeline_groups: int) -> None:
    print(f"{'backend':<8} {'run':>3} {'MCTS tok/s':>10} {'plain tok/s':>11} {'efficiency':>10} {'in gen':>6} "
          f"{'gen tok/s':>9} {'calls':>5} {'wall s':>6} {'tokens':>6} {'load':>5}")
    for run in runs:
        print(f"{run.backend:<8} {run.repeat:>3} {run.tokens_per_s:>10.0f} {run.plain_tokens_per_s:>11.0f} "
              f"{run.efficiency:>10.2f} {run.in_generate:>6.2f} {run.generate_tokens_per_s:>9.0f} "
              f"{run.generate_calls:>5} {run.wall_s:>6.1f} {run.tokens:>6} {run.load_1min:>5.1f}")
    print(f"target: efficiency >= {TARGET} (hf); pipeline_groups={pipeline_groups}; plain tok/s is the mean of the "
          "plain generate just before and just after the search; load = 1-minute load average after the search")
    for run in runs:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(run.node_kinds.items()))
        print(f"{run.backend} run {run.repeat}: plain {run.plain_before:.0f} -> {run.plain_after:.0f} tok/s; "
              f"{run.expansions} expansions; nodes: {kinds}")


@contextmanager
def working_directory(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kaizen-bench-rollout-") as temporary:
        yield Path(temporary)


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(document, tmp, indent=2)
    os.replace(tmp.name, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=("hf", "vllm"), default=["hf", "vllm"])
    parser.add_argument("--problems", type=int, default=32, help="curriculum problems searched (all levels); with the default "
                        "pipeline groups and width, 32 fill a 64-row batch per call, as a real round does")
    parser.add_argument("--width", type=int, default=4, help="candidates per expansion (the plain generate's n)")
    parser.add_argument("--rollouts", type=int, default=2, help="rollouts per problem")
    parser.add_argument("--max-step-tokens", type=int, default=96, help="token cap per step (and per plain sample)")
    parser.add_argument("--repeats", type=int, default=2, help="searches per backend (default %(default)s)")
    parser.add_argument("--sft-problems", type=int, default=300, help="teacher solutions the policy is tuned on")
    parser.add_argument("--sft-epochs", type=int, default=6, help="0: search with the untuned tiny model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="where models are built and cached (default: a temp dir)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the figures here")
    args = parser.parse_args()
    if min(args.problems, args.width, args.rollouts, args.max_step_tokens, args.repeats) < 1:
        parser.error("counts must be at least 1")

    backends = list(dict.fromkeys(args.backends))
    if "vllm" in backends:
        from models.vllm_server import vllm_available, vllm_python

        if not vllm_available():
            print(f"vllm: skipped, no vLLM environment at {vllm_python()} (`kaizen vllm install`)", file=sys.stderr)
            backends.remove("vllm")
    search = MCTSConfig(width=args.width, rollouts=args.rollouts, max_step_tokens=args.max_step_tokens, seed=args.seed)
    train, _ = make_curriculum(args.problems, 0, seed=args.seed)
    problems = [Problem(problem.id, problem.problem, problem.answer) for problem in train]
    with working_directory(args.workdir) as workdir:
        model = prepare_policy(workdir, seed=args.seed, sft_problems=args.sft_problems, sft_epochs=args.sft_epochs)
        runs = [run for backend in backends for run in measure_backend(backend, model, problems, search, args.repeats)]
    print_report(runs, RolloutStageConfig.pipeline_groups)
    print(f"{os.cpu_count()} CPUs")
    if args.json:
        write_json(args.json, {
            "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "search": {**asdict(search), "mode": search.mode.value},
            "runs": [{**asdict(run), "tokens_per_s": run.tokens_per_s, "plain_tokens_per_s": run.plain_tokens_per_s,
                      "efficiency": run.efficiency, "in_generate": run.in_generate,
                      "generate_tokens_per_s": run.generate_tokens_per_s} for run in runs],
            "cpus": os.cpu_count(),
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
