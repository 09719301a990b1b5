"""Mining speed: DuckDB SQL over 10M synthetic nodes against a plain Python tree walk, side by side.

The walk (`mine_by_tree_walk`) is the straightforward implementation a reader would write first:
rows to dicts, children lists per tree, a recursive pass for the correct/wrong leads, sorting each
node's children, walking parent links up for every prompt. It runs on a slice of whole trees
(default 1M rows) and is scaled to the full table by row count. It also serves as the correctness
oracle in tests/test_mining.py, so it applies exactly the same rules and tie-breaks as the SQL.

    python benchmarks/gen_nodes.py --rows 10000000 --out /tmp/synthetic_nodes
    python benchmarks/bench_mining.py --nodes /tmp/synthetic_nodes [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_store.mining import (
    Q_DECIMALS,
    MiningConfig,
    astro_completion,
    capped_edit_distance,
    find_node_files,
    mine,
    render_node_step,
    trajectory_mean_q,
    write_mined,
)
from search.mcts import MALFORMED_STEP_ERROR
from search.steps import render_prompt

Node = dict  # one row of the nodes table


class _Tree:
    """One search tree as parent/children dictionaries, with the walks the mining rules need."""

    def __init__(self, rows: Iterable[Node]) -> None:
        self.nodes = {row["node_id"]: row for row in rows}
        self.children: dict[int, list[Node]] = defaultdict(list)
        for row in self.nodes.values():
            self.children[row["parent_id"]].append(row)
        self.root = self.children[-1][0]
        self.leads: dict[int, tuple[bool, bool]] = {}
        self.nearest_failure: dict[int, Node | None] = {}
        self._visit(self.root)

    def _visit(self, node: Node) -> None:
        correct = node["kind"] == "answer" and node["correct"] is True
        wrong = node["kind"] == "answer" and node["correct"] is False
        failed_step = node["kind"] == "error" and node["error"] != MALFORMED_STEP_ERROR
        failure = node if failed_step or wrong else None
        for child in self.children[node["node_id"]]:
            self._visit(child)
            child_correct, child_wrong = self.leads[child["node_id"]]
            correct, wrong = correct or child_correct, wrong or child_wrong
            below = self.nearest_failure[child["node_id"]]
            if below is not None and (
                failure is None or (below["depth"], below["node_id"]) < (failure["depth"], failure["node_id"])
            ):
                failure = below
        self.leads[node["node_id"]] = (correct, wrong)
        self.nearest_failure[node["node_id"]] = failure

    def path(self, node: Node) -> list[Node]:
        """Nodes from the root's child down to `node` (the root has no step)."""
        steps = []
        while node["parent_id"] != -1:
            steps.append(node)
            node = self.nodes[node["parent_id"]]
        return steps[::-1]

    @staticmethod
    def text(path: list[Node]) -> str:
        return "".join(render_node_step(node["step"] or "", node["output"], node["kind"]) for node in path)


def _trajectory_stats(tree: _Tree) -> list[tuple[Node, float, float]]:
    stats = []
    for node in tree.nodes.values():
        if node["kind"] == "answer" and node["correct"] is not None:
            q_values = [step["q_value"] for step in tree.path(node)]
            stats.append((node, trajectory_mean_q(q_values), min(q_values)))
    return stats


def mine_by_tree_walk(nodes: pa.Table, problems: pa.Table, config: MiningConfig) -> tuple[list[dict], list[dict]]:
    """Pairs and SFT rows by walking each tree in Python; same rules and order as `mine`."""
    prompts = {
        pid: render_prompt(text)
        for pid, text in zip(problems["problem_id"].to_pylist(), problems["problem"].to_pylist(), strict=True)
    }
    trees: dict[tuple, list[Node]] = defaultdict(list)
    for row in nodes.to_pylist():
        trees[(row["run"], row["round"], row["problem_id"])].append(row)
    pairs: list[dict] = []
    sft: list[dict] = []
    for (run, round_number, problem_id), rows in sorted(trees.items()):
        tree = _Tree(rows)
        prompt = prompts[problem_id]
        base = {"run": run, "round": round_number, "problem_id": problem_id}
        pairs += _step_pairs(tree, prompt, base, config)
        stats = _trajectory_stats(tree)
        best = sorted((s for s in stats if s[0]["correct"]), key=lambda s: (-s[1], -s[2], s[0]["node_id"]))
        worst = sorted((s for s in stats if not s[0]["correct"]), key=lambda s: (s[1], s[2], s[0]["node_id"]))
        for chosen in best[: config.per_side]:
            for rejected in worst[: config.per_side]:
                pairs.append(
                    {
                        **base,
                        "prompt": prompt,
                        "pair_kind": "trajectory",
                        "node_id": tree.root["node_id"],
                        "chosen": tree.text(tree.path(chosen[0])),
                        "rejected": tree.text(tree.path(rejected[0])),
                        "chosen_id": chosen[0]["node_id"],
                        "rejected_id": rejected[0]["node_id"],
                        "q_chosen": chosen[1],
                        "q_rejected": rejected[1],
                        "margin": chosen[1] - rejected[1],
                    }
                )
        for rank, (leaf, mean_q, min_q) in enumerate(best[: config.sft_per_problem], start=1):
            completion = _astro_text(tree, leaf) if config.sft_format == "astro" else tree.text(tree.path(leaf))
            sft.append(
                {
                    **base,
                    "prompt": prompt,
                    "completion": completion,
                    "sft_format": config.sft_format,
                    "rank": rank,
                    "leaf_id": leaf["node_id"],
                    "mean_q": mean_q,
                    "min_q": min_q,
                }
            )
    pairs.sort(
        key=lambda p: (
            p["run"],
            p["round"],
            p["problem_id"],
            p["pair_kind"],
            p["node_id"],
            p["chosen_id"],
            p["rejected_id"],
        )
    )
    return pairs, sft


def _step_pairs(tree: _Tree, prompt: str, base: dict, config: MiningConfig) -> list[dict]:
    pairs = []
    for parent_id, children in tree.children.items():
        if parent_id == -1:
            continue
        good = sorted((c for c in children if tree.leads[c["node_id"]][0]), key=lambda c: (-c["q_value"], c["node_id"]))
        bad = sorted((c for c in children if tree.leads[c["node_id"]][1]), key=lambda c: (c["q_value"], c["node_id"]))
        for chosen in good[: config.per_side]:
            for rejected in bad[: config.per_side]:
                margin = chosen["q_value"] - rejected["q_value"]
                if chosen is rejected or round(margin, Q_DECIMALS) < config.margin:
                    continue
                if (
                    capped_edit_distance(chosen["step"], rejected["step"], config.min_edit_distance)
                    < config.min_edit_distance
                ):
                    continue
                parent = tree.nodes[parent_id]
                pairs.append(
                    {
                        **base,
                        "prompt": prompt + tree.text(tree.path(parent)),
                        "pair_kind": "step",
                        "node_id": parent_id,
                        "chosen": tree.text([chosen]),
                        "rejected": tree.text([rejected]),
                        "chosen_id": chosen["node_id"],
                        "rejected_id": rejected["node_id"],
                        "q_chosen": chosen["q_value"],
                        "q_rejected": rejected["q_value"],
                        "margin": margin,
                    }
                )
    return pairs


def _astro_text(tree: _Tree, leaf: Node) -> str:
    path = tree.path(leaf)
    on_path = [tree.root, *path]
    for depth in range(len(path) - 1, -1, -1):  # the deepest divergence first
        siblings = [c for c in tree.children[on_path[depth]["node_id"]] if c is not on_path[depth + 1]]
        failures = [
            failure for c in siblings if (failure := tree.nearest_failure[c["node_id"]]) is not None
            and not (failure is c and c["kind"] == "answer")  # a wrong answer right at the fork: nothing to undo
        ]
        if failures:
            failure = min(failures, key=lambda f: (f["depth"], f["node_id"]))
            branch = [node for node in tree.path(failure)[depth:] if node["kind"] != "answer"]  # ends at its output
            return astro_completion(tree.text(path[:depth]), tree.text(branch), tree.text(path[depth:]),
                                    failure["kind"], failure["error"], failure["answer"])
    return tree.text(path)


PAIR_KEY = ("run", "round", "problem_id", "pair_kind", "node_id", "chosen_id", "rejected_id")
SFT_KEY = ("run", "round", "problem_id", "rank", "leaf_id")


def _keys(rows: list[dict], columns: tuple[str, ...]) -> list[tuple]:
    return [tuple(row[column] for column in columns) for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=Path, required=True, help="directory written by benchmarks/gen_nodes.py")
    parser.add_argument("--walk-rows", type=int, default=1_000_000, help="rows (whole trees) the Python walk mines")
    parser.add_argument("--sft-format", choices=("rstar", "astro"), default="rstar")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    config = MiningConfig(sft_format=args.sft_format)
    problems = pq.read_table(args.nodes / "problems.parquet")
    files = find_node_files([args.nodes])
    total_rows = sum(pq.read_metadata(path).num_rows for path in files)

    started, started_cpu = time.perf_counter(), time.process_time()
    result = mine(files, problems, config)
    sql_s, sql_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        write_mined(result, out)
        write_s = time.perf_counter() - started

    walk_files, walk_rows = [], 0
    for path in files:  # the generator cuts files at tree boundaries
        if walk_rows >= args.walk_rows:
            break
        walk_files.append(path)
        walk_rows += pq.read_metadata(path).num_rows
    started, started_cpu = time.perf_counter(), time.process_time()
    walk_pairs, walk_sft = mine_by_tree_walk(pq.read_table(walk_files), problems, config)
    walk_s, walk_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu
    sql_slice = mine(walk_files, problems, config)
    agree = _keys(sql_slice.pairs.to_pylist(), PAIR_KEY) == _keys(walk_pairs, PAIR_KEY) and _keys(
        sql_slice.sft.to_pylist(), SFT_KEY
    ) == _keys(walk_sft, SFT_KEY)

    scale = total_rows / walk_rows
    walk_scaled_s, walk_scaled_cpu_s = walk_s * scale, walk_cpu_s * scale
    figures = {
        "rows": total_rows,
        "sql_s": round(sql_s, 2),
        "sql_cpu_s": round(sql_cpu_s, 2),
        "sql_stages_s": {stage: round(seconds, 2) for stage, seconds in result.timings.items()},
        "write_s": round(write_s, 2),
        "pairs": result.pairs.num_rows,
        "sft_rows": result.sft.num_rows,
        "walk_rows": walk_rows,
        "walk_s": round(walk_s, 2),
        "walk_cpu_s": round(walk_cpu_s, 2),
        "walk_scaled_s": round(walk_scaled_s, 1),
        "walk_scaled_cpu_s": round(walk_scaled_cpu_s, 1),
        "speedup": round(walk_scaled_s / sql_s, 1),
        "speedup_cpu": round(walk_scaled_cpu_s / sql_cpu_s, 1),
        "walk_agrees_on_slice": agree,
        "sft_format": args.sft_format,
    }
    stages = ", ".join(f"{stage} {seconds}" for stage, seconds in figures["sql_stages_s"].items())
    # CPU seconds next to wall seconds: on a shared machine the wall clock also counts other processes.
    print(f"{'':24}{'rows':>12}{'wall s':>10}{'CPU s':>10}")
    print(f"{'DuckDB SQL':24}{total_rows:>12,}{sql_s:>10.1f}{sql_cpu_s:>10.1f}")
    print(f"{'Python walk':24}{walk_rows:>12,}{walk_s:>10.1f}{walk_cpu_s:>10.1f}")
    print(f"{'Python walk, scaled':24}{total_rows:>12,}{walk_scaled_s:>10.1f}{walk_scaled_cpu_s:>10.1f}")
    print(f"SQL stages (wall s): {stages}; writing pairs.parquet and sft.parquet: {write_s:.1f} s more")
    print(f"speed-up {figures['speedup']}x wall, {figures['speedup_cpu']}x CPU; {result.summary()}")
    print(f"walk and SQL agree on the slice: {agree}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
