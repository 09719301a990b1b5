"""The run report: summary rows from the rounds table, and the self-contained HTML report with its plots."""

from __future__ import annotations

import json
import random
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from data_store.home import Layout
from data_store.parquet import write_table
from models import report
from models.report import OFF_CORRECT_PATH, ON_CORRECT_PATH, read_run, round_markdown, summary_rows, write_run_report

RUN = "synthetic"
BENCHMARK = "curriculum-test"
LEVELS = ("1", "2", "3")
PLOTS = 4  # accuracy, solve rate by level, Q-values, cost


def round_metrics(round_number: int) -> dict:
    """Made-up figures that improve round by round; ppm@8 appears once a PPM exists (round 2)."""
    accuracy = {f"{BENCHMARK}/greedy": 0.1 + 0.1 * round_number, f"{BENCHMARK}/maj@8": 0.15 + 0.1 * round_number}
    if round_number >= 2:
        accuracy[f"{BENCHMARK}/ppm@8"] = 0.2 + 0.1 * round_number
    metrics: dict = {"eval": accuracy, "wall_s": 30.0 + round_number}
    if round_number > 0:
        by_level = {level: [min(8, 8 - 2 * int(level) + round_number), 8] for level in LEVELS}
        solved = sum(counts[0] for counts in by_level.values())
        metrics.update(pairs=100 * round_number, sft_examples=20 * round_number, trees=24, trees_solved=solved,
                       solved_share=solved / 24, solved_by_level=by_level)
    return metrics


def write_rounds_row(layout: Layout, round_number: int, gate_passed: bool = True) -> None:
    started = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=round_number)
    metrics = round_metrics(round_number)
    row = {
        "run": RUN, "round": round_number, "started_at": started,
        "finished_at": started + timedelta(seconds=metrics["wall_s"]), "policy_checkpoint": f"policy-{round_number}",
        "ppm_checkpoint": None, "metrics": json.dumps(metrics), "gate_passed": gate_passed,
        "gate_reason": f"greedy rose in round {round_number}" if gate_passed else "greedy fell by 12.0 points",
    }
    write_table(pa.Table.from_pylist([row]), layout.table_path(RUN, round_number, "rounds"), table="rounds")


def write_eval_rows(layout: Layout, round_number: int) -> None:
    rows = []
    for metric, accuracy in round_metrics(round_number)["eval"].items():
        mode = metric.rpartition("/")[2]
        for index in range(20):
            rows.append({"run": RUN, "round": round_number, "benchmark": BENCHMARK, "problem_id": f"p{index}",
                         "mode": mode, "correct": index < accuracy * 20, "grader_status": "ok",
                         "tokens": 40 * (8 if "@" in mode else 1)})
    write_table(pa.Table.from_pylist(rows), layout.table_path(RUN, round_number, "eval"), table="eval")


def tree_rows(round_number: int, problem_id: str, rng: random.Random) -> list[dict]:
    """root -> 3 steps -> 2 answers each; a step whose answer is correct gets a higher Q-value."""
    # Every row has every key: pa.Table.from_pylist takes its columns from the first row.
    base = {"run": RUN, "round": round_number, "problem_id": problem_id, "visits": 1, "answer": None, "correct": None}
    rows = [{**base, "node_id": 0, "parent_id": -1, "depth": 0, "step": "", "kind": "root", "q_value": 0.0}]
    for step in range(3):
        step_id = 1 + step * 3
        correct = [rng.random() < 0.2 + 0.15 * round_number for _ in range(2)]
        q_step = max(-1.0, min(1.0, (0.5 if any(correct) else -0.5) + rng.gauss(0, 0.25)))
        rows.append({**base, "node_id": step_id, "parent_id": 0, "depth": 1, "step": "s", "kind": "step",
                     "q_value": q_step})
        for answer, is_correct in enumerate(correct):
            rows.append({**base, "node_id": step_id + 1 + answer, "parent_id": step_id, "depth": 2, "step": "a",
                         "kind": "answer", "answer": "1", "correct": is_correct,
                         "q_value": 1.0 if is_correct else -1.0})
    rows.append({**base, "node_id": 10, "parent_id": 0, "depth": 1, "step": "x", "kind": "error", "q_value": -1.0})
    return rows


def write_nodes_shards(layout: Layout, round_number: int, shards: int = 2) -> None:
    rng = random.Random(round_number)
    for shard in range(shards):
        rows = [row for index in range(shard, 24, shards) for row in tree_rows(round_number, f"p{index}", rng)]
        write_table(pa.Table.from_pylist(rows), layout.table_path(RUN, round_number, "nodes", shard=shard),
                    table="nodes")


def make_synthetic_run(home: Path, rounds: int = 4, *, nodes: bool = True, failed_round: int | None = None) -> Layout:
    """A run with rounds 0..rounds through the real writers (round 0: no search, like the bootstrap)."""
    layout = Layout(home)
    for round_number in range(rounds + 1):
        write_rounds_row(layout, round_number, gate_passed=round_number != failed_round)
        write_eval_rows(layout, round_number)
        if nodes and round_number > 0:
            write_nodes_shards(layout, round_number)
    return layout


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return make_synthetic_run(tmp_path / "home", failed_round=4)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The default report of the synthetic run, rendered once for the tests that only read it."""
    layout = make_synthetic_run(tmp_path_factory.mktemp("home"), failed_round=4)
    path = write_run_report(layout, RUN)
    assert path == layout.run_dir(RUN) / "report.html"
    return path.read_text(encoding="utf-8")


def table_rows(html: str) -> list[str]:
    return re.findall(r"<tr><td>.*?</tr>", html, flags=re.DOTALL)


# --- summary rows ------------------------------------------------------------------------------------


def test_summary_rows_map_the_held_out_metrics_of_the_benchmark(layout: Layout) -> None:
    row = summary_rows(layout, RUN, BENCHMARK)[3]
    assert (row["round"], row["greedy_accuracy"], row["maj8_accuracy"], row["ppm8_accuracy"]) == pytest.approx(
        (3, 0.4, 0.45, 0.5))


def test_summary_rows_carry_search_mining_gate_and_wall_figures(layout: Layout) -> None:
    metrics = round_metrics(2)
    row = summary_rows(layout, RUN, BENCHMARK)[2]
    assert {key: row[key] for key in ("solved_share", "pairs", "sft_examples", "gate_passed", "wall_s")} == {
        "solved_share": metrics["solved_share"], "pairs": 200, "sft_examples": 40, "gate_passed": True,
        "wall_s": 32.0}


def test_summary_rows_have_none_for_a_mode_a_round_did_not_evaluate(layout: Layout) -> None:
    assert [row["ppm8_accuracy"] is None for row in summary_rows(layout, RUN, BENCHMARK)] == [
        True, True, False, False, False]


def test_summary_rows_have_none_for_search_figures_of_the_bootstrap_round(layout: Layout) -> None:
    bootstrap = summary_rows(layout, RUN, BENCHMARK)[0]
    assert (bootstrap["solved_share"], bootstrap["pairs"], bootstrap["sft_examples"]) == (None, None, None)


def test_summary_rows_count_the_teacher_table_as_round_zero_sft_examples(layout: Layout) -> None:
    teacher = [{"prompt": "q", "completion": "a", "run": RUN, "round": 0, "problem_id": f"t{index}",
                "sft_format": "teacher", "rank": 1, "leaf_id": -1, "mean_q": 1.0, "min_q": 1.0} for index in range(7)]
    write_table(pa.Table.from_pylist(teacher), layout.table_path(RUN, 0, "sft"), table="sft")
    assert summary_rows(layout, RUN, BENCHMARK)[0]["sft_examples"] == 7


def test_summary_rows_of_another_benchmark_are_all_none(layout: Layout) -> None:
    rows = summary_rows(layout, RUN, "math500")
    assert {row["greedy_accuracy"] for row in rows} == {None}


def test_summary_rows_list_rounds_in_order_and_ignore_other_runs(layout: Layout) -> None:
    other = pa.Table.from_pylist([{"run": "other", "round": 9, "metrics": "{}"}])
    write_table(other, layout.table_path("other", 9, "rounds"), table="rounds")
    assert [row["round"] for row in summary_rows(layout, RUN, BENCHMARK)] == [0, 1, 2, 3, 4]


def test_summary_rows_leave_out_rounds_past_the_asked_one(layout: Layout) -> None:
    assert [row["round"] for row in summary_rows(layout, RUN, BENCHMARK, through_round=2)] == [0, 1, 2]


def test_summary_rows_leave_out_stale_rounds(layout: Layout) -> None:
    layout.stale_marker(RUN, 3).write_text("{}")
    layout.stale_marker(RUN, 4).write_text("{}")
    assert [row["round"] for row in summary_rows(layout, RUN, BENCHMARK)] == [0, 1, 2]


def test_the_report_leaves_out_stale_rounds(layout: Layout) -> None:
    layout.stale_marker(RUN, 4).write_text("{}")
    assert len(table_rows(write_run_report(layout, RUN).read_text(encoding="utf-8"))) == 4


# --- reading the trees ---------------------------------------------------------------------------------


def q_value_tree(tmp_path: Path) -> Layout:
    """root -> step 1 -> step 2 -> correct answer 3; step 1 -> wrong answer 4; root -> step 5 -> unvisited step 6."""
    layout = Layout(tmp_path)
    base = {"run": RUN, "round": 1, "problem_id": "p", "visits": 1, "step": "s", "correct": None}
    nodes = [
        {**base, "node_id": 0, "parent_id": -1, "depth": 0, "kind": "root", "q_value": 0.0},
        {**base, "node_id": 1, "parent_id": 0, "depth": 1, "kind": "step", "q_value": 0.5},
        {**base, "node_id": 2, "parent_id": 1, "depth": 2, "kind": "step", "q_value": 0.25},
        {**base, "node_id": 3, "parent_id": 2, "depth": 3, "kind": "answer", "correct": True, "q_value": 1.0},
        {**base, "node_id": 4, "parent_id": 1, "depth": 2, "kind": "answer", "correct": False, "q_value": -1.0},
        {**base, "node_id": 5, "parent_id": 0, "depth": 1, "kind": "step", "q_value": -0.5},
        {**base, "node_id": 6, "parent_id": 5, "depth": 2, "kind": "step", "q_value": 0.0, "visits": 0},
    ]
    write_table(pa.Table.from_pylist(nodes), layout.table_path(RUN, 1, "nodes", shard=0), table="nodes")
    return layout


def test_q_values_split_steps_by_a_correct_answer_below_them(tmp_path: Path) -> None:
    q_values = read_run(q_value_tree(tmp_path), RUN).q_values[1]
    assert (sorted(q_values[ON_CORRECT_PATH]), sorted(q_values[OFF_CORRECT_PATH])) == ([0.25, 0.5], [-0.5])


# --- the HTML report ----------------------------------------------------------------------------------


def test_report_embeds_one_image_per_plot_as_base64_png(report_html: str) -> None:
    images = re.findall(r"<img [^>]*>", report_html)
    assert len(images) == PLOTS and all('src="data:image/png;base64,' in image for image in images)


def test_report_references_nothing_outside_the_file(report_html: str) -> None:
    html = report_html
    # ':' is not a base64 character, so embedded images cannot produce a false match.
    assert "http://" not in html and "https://" not in html
    assert re.findall(r'(?:src|href)="(?!data:)', html) == [] and "<link" not in html and "<script" not in html


def test_report_table_lists_every_round_with_its_gate_decision(report_html: str) -> None:
    rows = table_rows(report_html)
    decisions = [(re.match(r"<tr><td>(\d+)</td>", row).group(1),
                  re.search(r'class="badge \w+">([\w ]+)<', row).group(1)) for row in rows]
    assert decisions == [("0", "passed"), ("1", "passed"), ("2", "passed"), ("3", "passed"), ("4", "failed")]


def test_report_table_shows_the_gate_reasons(report_html: str) -> None:
    rows = table_rows(report_html)
    assert "greedy fell by 12.0 points" in rows[4] and "greedy rose in round 3" in rows[3]


def test_report_table_has_a_column_per_benchmark_mode(report_html: str) -> None:
    headers = re.findall(r"<th>(.*?)</th>", report_html)
    assert [header for header in headers if header.startswith(BENCHMARK)] == [
        f"{BENCHMARK}/greedy", f"{BENCHMARK}/maj@8", f"{BENCHMARK}/ppm@8"]


def test_report_survives_a_run_without_search_trees(tmp_path: Path) -> None:
    layout = make_synthetic_run(tmp_path, rounds=2, nodes=False)
    html = write_run_report(layout, RUN).read_text(encoding="utf-8")
    assert len(re.findall(r"<img ", html)) == PLOTS - 1 and "No search trees" in html


def test_report_of_a_bootstrap_only_run_has_its_round(tmp_path: Path) -> None:
    layout = make_synthetic_run(tmp_path, rounds=0)
    html = write_run_report(layout, RUN).read_text(encoding="utf-8")
    assert len(table_rows(html)) == 1 and "No round has searched problems yet" in html


def test_report_goes_where_out_says(layout: Layout, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "demo.html"
    assert write_run_report(layout, RUN, out) == out and out.exists()


def test_a_failing_plot_leaves_no_report_behind(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report, "_render", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        write_run_report(layout, RUN)
    assert list(layout.run_dir(RUN).glob("*report*")) == []


def test_a_failing_write_keeps_the_previous_report(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = layout.run_dir(RUN) / "report.html"
    previous.write_text("the previous report", encoding="utf-8")

    def broken(path: Path, text: str, **kwargs: object) -> None:
        Path.write_bytes(path, text.encode()[:100])  # a partial file, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        write_run_report(layout, RUN)
    assert previous.read_bytes() == b"the previous report"
    assert [path.name for path in previous.parent.iterdir() if path.name.startswith(".")] == []


# --- the per-round markdown ---------------------------------------------------------------------------


def test_round_markdown_shows_the_gate_and_the_evaluation_table() -> None:
    record = SimpleNamespace(round=2, gate_passed=False, gate_reasons=["greedy fell"], stats={},
                             policy=SimpleNamespace(path="policy"), ppm=None)
    text = round_markdown(RUN, record, [{"benchmark": BENCHMARK, "mode": "greedy", "accuracy": 0.25}])
    assert "**Gate FAILED (not promoted)**" in text and f"| {BENCHMARK} | greedy | 0.250 |" in text
