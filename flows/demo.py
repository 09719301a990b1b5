"""`kaizen demo`: self-evolution rounds of the rStar-Math recipe on a tiny model, on CPU.

Round 0 bootstraps: a tiny causal LM is built locally and fine-tuned on the programmatic teacher's
solutions of the easiest curriculum level (rStar's large-teacher round). Each later round searches
the training problems with MCTS (terminal-guided in rounds 1-2, PPM-augmented from round 3), mines
pairs and SFT trajectories from all trees so far, retrains the policy from the base model on all
verified data, trains the PPM from the new policy, and measures held-out greedy accuracy.

The stages are the same core functions a GPU run uses; only the sizes below differ. The Prefect
flows (evolve/round) will orchestrate these stages; until then this runs them in sequence.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_store.home import Layout, get_home
from data_store.parquet import atomic_path

RUN = "demo"
RECIPES_DIR = Path(__file__).resolve().parents[1] / "deployments" / "recipes"
TRAINING_RECIPE = RECIPES_DIR / "train_cpu_tiny.yaml"


@dataclass
class DemoConfig:
    """Sizes of the embedded CPU default."""

    rounds: int = field(default=1, metadata={"help": "search-and-train rounds after the bootstrap round 0"})
    train_problems: int = field(default=120, metadata={"help": "curriculum training problems (all levels)"})
    test_problems: int = field(default=60, metadata={"help": "held-out problems, never trained on"})
    rollouts: int = field(default=4, metadata={"help": "MCTS rollouts per problem"})
    width: int = field(default=4, metadata={"help": "candidate steps per expansion"})
    max_step_tokens: int = field(default=96, metadata={"help": "token cap per generated step"})
    teacher_problems: int = field(default=300, metadata={"help": "easiest-level problems the teacher solves for round 0"})
    bootstrap_epochs: float = field(default=4.0, metadata={"help": "round-0 SFT epochs (a random model needs many)"})
    bootstrap_learning_rate: float = field(default=2e-3, metadata={"help": "round-0 SFT learning rate"})
    seed: int = field(default=0, metadata={"help": "seed of the curriculum, the model and the search"})


@dataclass
class RoundSummary:
    round: int
    greedy_accuracy: float
    solved_share: float | None
    pairs: int
    sft_examples: int
    wall_s: float


def _greedy_accuracy(model: Path, problems: list, seed: int) -> float:
    """Held-out pass@1: one greedy trajectory per problem through the real step format and sandbox."""
    from models.rollout import RolloutStageConfig, search_trees
    from search.mcts import MCTSConfig

    config = RolloutStageConfig(mcts=MCTSConfig(width=1, rollouts=1, temperature=0.0, max_step_tokens=128, seed=seed))
    result = search_trees(problems, model=model, config=config)
    return result.stats.trees_solved / max(len(problems), 1)


def run_demo(home: Path, config: DemoConfig) -> list[RoundSummary]:
    import pyarrow as pa

    from data_store.curriculum import EASIEST_LEVEL, bootstrap_sft_rows, curriculum_corpus, make_curriculum, write_problems
    from data_store.mining import MiningConfig, mine, write_mined
    from data_store.parquet import write_table
    from data_store.problems import load_problems
    from models.rollout import RolloutStageConfig, rollout_stage, search_problems, tqdm_progress
    from models.tiny import build_tiny_model
    from models.training import train_ppm, train_sft
    from search.mcts import MCTSConfig, SearchMode

    layout = Layout(home)
    train, test = make_curriculum(config.train_problems, config.test_problems, seed=config.seed)
    train_file = write_problems(train, layout.problems_path("curriculum-train"))
    test_file = write_problems(test, layout.problems_path("curriculum-test"))
    train_problems = search_problems(load_problems(train_file))
    test_problems = search_problems(load_problems(test_file))
    summaries: list[RoundSummary] = []

    started = time.monotonic()
    base = layout.checkpoint_dir(RUN, 0, "base")
    if not base.exists():
        print("round 0: building the tiny model", file=sys.stderr)
        build_tiny_model(base, corpus=curriculum_corpus(seed=config.seed), seed=config.seed)
    bootstrap_sft = layout.table_path(RUN, 0, "sft")
    # The teacher's solutions are verified by construction: full marks, no tree behind them.
    teacher_rows = [
        {**row, "run": RUN, "round": 0, "sft_format": "teacher", "rank": 1, "leaf_id": -1, "mean_q": 1.0, "min_q": 1.0}
        for row in bootstrap_sft_rows(make_curriculum(config.teacher_problems, 0, seed=config.seed + 1, levels=(EASIEST_LEVEL,))[0])
    ]
    write_table(pa.Table.from_pylist(teacher_rows), bootstrap_sft, table="sft")
    policy = layout.checkpoint_dir(RUN, 0, "policy")
    if not policy.exists():
        print("round 0: fine-tuning on the teacher's easiest-level solutions", file=sys.stderr)
        train_sft([bootstrap_sft], policy, recipe=TRAINING_RECIPE, base_model=str(base),
                  overrides={"num_train_epochs": config.bootstrap_epochs, "learning_rate": config.bootstrap_learning_rate})
    summaries.append(
        RoundSummary(0, _greedy_accuracy(policy, test_problems, config.seed), None, 0,
                     pa.parquet.read_metadata(bootstrap_sft).num_rows, time.monotonic() - started)
    )

    sft_tables, pair_tables, node_files = [bootstrap_sft], [], []
    ppm: Path | None = None
    for round_number in range(1, config.rounds + 1):
        started = time.monotonic()
        mode = SearchMode.PPM if round_number >= 3 and ppm is not None else SearchMode.TERMINAL
        search = RolloutStageConfig(
            mcts=MCTSConfig(rollouts=config.rollouts, width=config.width, max_step_tokens=config.max_step_tokens,
                            mode=mode, seed=config.seed + round_number)
        )
        nodes = layout.table_path(RUN, round_number, "nodes")
        update, close = tqdm_progress(f"round {round_number}: rollouts")
        try:
            stats = rollout_stage(train_problems, model=policy, out=nodes, config=search,
                                  ppm=ppm if mode is SearchMode.PPM else None,
                                  run=RUN, round_number=round_number, on_progress=update)
        finally:
            close()
        node_files.append(nodes)
        mined = mine(node_files, load_problems(train_file), MiningConfig())
        pairs_path, sft_path = write_mined(mined, layout.stage_dir(RUN, round_number, "mine"))
        print(f"round {round_number}: {mined.summary()}", file=sys.stderr)
        sft_tables.append(sft_path)
        pair_tables.append(pairs_path)
        policy = layout.checkpoint_dir(RUN, round_number, "policy")
        train_sft(sft_tables, policy, recipe=TRAINING_RECIPE, base_model=str(base), overwrite=True)
        if mined.pairs.num_rows:
            ppm = train_ppm([pairs_path], layout.checkpoint_dir(RUN, round_number, "ppm"),
                            recipe=TRAINING_RECIPE, base_model=str(policy), overwrite=True)
        summaries.append(
            RoundSummary(round_number, _greedy_accuracy(policy, test_problems, config.seed),
                         stats.trees_solved / max(stats.trees, 1), mined.pairs.num_rows, mined.sft.num_rows,
                         time.monotonic() - started)
        )
    return summaries


def cli_demo(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kaizen demo", description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="data home (default: $KAIZEN_HOME or ./kaizen_home)")
    parser.add_argument("--rounds", type=int, default=DemoConfig.rounds, help="rounds after bootstrap (default %(default)s)")
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    args = parser.parse_args(argv)
    home = (args.home or get_home()).resolve()
    started = time.monotonic()
    summaries = run_demo(home, DemoConfig(rounds=args.rounds, seed=args.seed))
    total = time.monotonic() - started
    print(f"{'round':>5} {'greedy':>7} {'solved':>7} {'pairs':>6} {'sft':>5} {'wall_s':>7}")
    for s in summaries:
        solved = "-" if s.solved_share is None else f"{s.solved_share:.2f}"
        print(f"{s.round:>5} {s.greedy_accuracy:>7.2f} {solved:>7} {s.pairs:>6} {s.sft_examples:>5} {s.wall_s:>7.1f}")
    summary_path = home / "runs" / RUN / "summary.json"
    with atomic_path(summary_path) as temporary:
        temporary.write_text(json.dumps({"rounds": [asdict(s) for s in summaries], "total_wall_s": total}, indent=2))
    print(f"summary -> {summary_path}")
    return 0
