"""Human-readable reports: each round's markdown, and a run's self-contained HTML report.

`round_markdown` is the text a Prefect artifact shows for one round (the flows publish it).
`write_run_report` reads a run's recorded rounds, evaluation tables and search trees from the data
home and writes one HTML file with the per-round table and plots (accuracy by round and mode,
solve rate by difficulty, Q-value distributions, cost); `summary_rows` gives the demo's summary
table from the same figures. Plots use matplotlib's Agg canvas, imported only when drawing.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from data_store.home import Layout
from data_store.parquet import atomic_path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (floats with three decimals)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return "-" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def round_markdown(run: str, record: Any, eval_summary: Sequence[Mapping[str, Any]]) -> str:
    """The round's report: gate decision and reasons, evaluation, search and mining figures."""
    verdict = "passed (promoted)" if record.gate_passed else "FAILED (not promoted)"
    parts = [f"# {run}: round {record.round}", "", f"**Gate {verdict}**", ""]
    parts += [f"- {reason}" for reason in record.gate_reasons]
    if eval_summary:
        columns = [key for key in ("benchmark", "mode", "accuracy", "correct", "n", "tokens", "wall_s")
                   if key in eval_summary[0]]
        parts += ["", "## Evaluation", "", markdown_table(columns, [[row.get(c) for c in columns] for row in eval_summary])]
    stats = record.stats
    if "trees" in stats:
        parts += ["", "## Search and mining", "", markdown_table(
            ["problems searched", "solved", "solved share", "pairs", "SFT examples"],
            [[stats["trees"], stats["trees_solved"], stats.get("solved_share"), stats["pairs"], stats["sft_examples"]]],
        )]
    by_level = stats.get("solved_by_level") or {}
    if by_level:
        parts += ["", "## Solve rate by difficulty", "", markdown_table(
            ["level", "solved", "searched", "rate"],
            [[level, solved, total, solved / total if total else 0.0] for level, (solved, total) in by_level.items()],
        )]
    parts += ["", f"Policy: `{record.policy.path}`", f"PPM: `{record.ppm.path if record.ppm else 'none'}`"]
    return "\n".join(parts) + "\n"


# --- the run report ------------------------------------------------------------------------------

REPORT_FILE = "report.html"
# The held-out figures of the demo's summary: summary field -> evaluation mode.
SUMMARY_MODES = {"greedy_accuracy": "greedy", "maj8_accuracy": "maj@8", "ppm8_accuracy": "ppm@8"}
ON_CORRECT_PATH = "on a path to a correct answer"
OFF_CORRECT_PATH = "no correct answer below"
_DPI = 110
_PLOT_STYLE = {
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9, "legend.frameon": False,
    "font.size": 10,
}


@dataclass(frozen=True)
class RoundFigures:
    """One recorded round as the report shows it; None where the round has no such figure."""

    round: int
    accuracy: dict[str, float]  # `benchmark/mode` -> held-out accuracy
    solved_share: float | None
    trees: int | None
    trees_solved: int | None
    solved_by_level: dict[str, list[int]]  # level -> [solved, searched]
    pairs: int | None
    sft_examples: int | None
    gate_passed: bool | None
    gate_reason: str
    wall_s: float | None


@dataclass(frozen=True)
class RunData:
    """Everything the run report plots, read once from the data home."""

    run: str
    rounds: list[RoundFigures]
    eval_tokens: dict[int, dict[str, int]]  # round -> `benchmark/mode` -> generated tokens
    q_values: dict[int, dict[str, Any]]  # round -> ON/OFF_CORRECT_PATH -> numpy array of visited steps' Q-values


@dataclass(frozen=True)
class Plot:
    """A rendered figure of the report, or the note that replaces it when its data is missing."""

    title: str
    caption: str
    png: bytes | None
    note: str = ""


def run_files(layout: Layout, run: str, table: str) -> list[Path]:
    """The finished files of `table` under one run, in path order (so rounds and shards ascend)."""
    run_dir = layout.run_dir(run)
    return [path for path in layout.table_files(table) if run_dir in path.parents]


def _is_current(layout: Layout, run: str, round_number: int, through_round: int | None) -> bool:
    stale = layout.stale_marker(run, round_number).exists()
    return not stale and (through_round is None or round_number <= through_round)


def round_rows(layout: Layout, run: str, through_round: int | None = None) -> list[dict[str, Any]]:
    """The `rounds` table rows of a run (up to `through_round`), oldest first, metrics JSON decoded.

    Rounds marked stale are left out: a round before them ran again and changed what they were built
    on, so their figures no longer belong to the run. Read without a recipe and without importing the
    pipeline (whose imports load torch and transformers: seconds, for a report).
    """
    import pyarrow.parquet as pq

    rows = [row for path in run_files(layout, run, "rounds") for row in pq.read_table(path).to_pylist()
            if _is_current(layout, run, row["round"], through_round)]
    for row in rows:
        row["metrics"] = json.loads(row["metrics"] or "{}")
    return sorted(rows, key=lambda row: row["round"])


def round_figures(layout: Layout, run: str, through_round: int | None = None) -> list[RoundFigures]:
    """The figures of every round `round_rows` keeps; round 0's SFT count is its teacher table's size."""
    figures = []
    for row in round_rows(layout, run, through_round):
        metrics = row["metrics"]
        sft_examples = metrics.get("sft_examples")
        if sft_examples is None:
            sft_examples = _table_size(layout.table_path(run, row["round"], "sft"))
        figures.append(RoundFigures(
            round=row["round"], accuracy=dict(metrics.get("eval") or {}), solved_share=metrics.get("solved_share"),
            trees=metrics.get("trees"), trees_solved=metrics.get("trees_solved"),
            solved_by_level=dict(metrics.get("solved_by_level") or {}), pairs=metrics.get("pairs"),
            sft_examples=sft_examples, gate_passed=row.get("gate_passed"), gate_reason=row.get("gate_reason") or "",
            wall_s=metrics.get("wall_s"),
        ))
    return figures


def summary_rows(layout: Layout, run: str, benchmark: str, through_round: int | None = None) -> list[dict[str, Any]]:
    """The demo's summary rows (one per recorded round) with `benchmark`'s held-out accuracies.

    Keys: round, greedy_accuracy, maj8_accuracy, ppm8_accuracy (fractions), solved_share, pairs,
    sft_examples, gate_passed, wall_s; None where the round has no such figure (round 0 searches
    nothing; ppm@8 needs a PPM).
    """
    return [
        {
            "round": figures.round,
            **{name: figures.accuracy.get(f"{benchmark}/{mode}") for name, mode in SUMMARY_MODES.items()},
            "solved_share": figures.solved_share, "pairs": figures.pairs, "sft_examples": figures.sft_examples,
            "gate_passed": figures.gate_passed, "wall_s": figures.wall_s,
        }
        for figures in round_figures(layout, run, through_round)
    ]


def read_run(layout: Layout, run: str, through_round: int | None = None) -> RunData:
    """The rounds (those `round_rows` keeps), evaluation token counts and search-tree Q-values of a run
    (missing pieces are empty)."""
    def current(by_round: dict[int, Any]) -> dict[int, Any]:  # recorded rounds or not (yet)
        return {number: value for number, value in by_round.items() if _is_current(layout, run, number, through_round)}

    return RunData(run, round_figures(layout, run, through_round),
                   current(_eval_tokens(run_files(layout, run, "eval"))), current(_q_values(run_files(layout, run, "nodes"))))


def write_run_report(layout: Layout, run: str, out: Path | None = None, through_round: int | None = None) -> Path:
    """Write the run's self-contained HTML report (default `{home}/runs/{run}/report.html`) atomically.

    One file, no external references: inline CSS, plots as base64 PNG. Rounds without search
    trees or evaluation files are shown with what they have; a plot with no data at all is
    replaced by a note.
    """
    out = Path(out) if out is not None else layout.run_dir(run) / REPORT_FILE
    data = read_run(layout, run, through_round)
    document = render_html(data, [_accuracy_plot(data), _level_plot(data), _q_value_plot(data), _cost_plot(data)])
    with atomic_path(out) as temporary:
        temporary.write_text(document, encoding="utf-8")
    return out


# --- reading ---------------------------------------------------------------------------------------


def _table_size(path: Path) -> int | None:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows if path.exists() else None


def _query(files: Sequence[Path], sql: str) -> list[tuple[Any, ...]]:
    """`sql` over the files as the relation `source` (no rows when there are no files)."""
    if not files:
        return []
    import duckdb

    with duckdb.connect() as con:
        con.read_parquet([str(path) for path in files], union_by_name=True).create_view("source")
        return con.execute(sql).fetchall()


def _eval_tokens(files: Sequence[Path]) -> dict[int, dict[str, int]]:
    tokens: dict[int, dict[str, int]] = {}
    for round_number, metric, count in _query(
        files, "SELECT round, benchmark || '/' || mode, sum(tokens) FROM source GROUP BY ALL ORDER BY ALL"
    ):
        tokens.setdefault(round_number, {})[metric] = int(count)
    return tokens


# A step leads to a correct answer when a correct answer node is below it: walk up from every correct
# answer node to the root. Answer nodes are left out (their Q-value is their +-1 reward, which the split
# already says), and so are unvisited steps (Q-value 0 only because nothing was backed up yet).
_Q_VALUES_SQL = """
WITH RECURSIVE correct_path(round, problem_id, node_id, parent_id) AS (
    SELECT round, problem_id, node_id, parent_id FROM source WHERE kind = 'answer' AND correct
    UNION
    SELECT n.round, n.problem_id, n.node_id, n.parent_id
    FROM source n JOIN correct_path c ON n.round = c.round AND n.problem_id = c.problem_id AND n.node_id = c.parent_id
)
SELECT n.round, c.node_id IS NOT NULL, list(n.q_value)
FROM source n LEFT JOIN (SELECT DISTINCT round, problem_id, node_id FROM correct_path) c
    USING (round, problem_id, node_id)
WHERE n.kind = 'step' AND n.visits > 0
GROUP BY ALL ORDER BY ALL
"""


def _q_values(files: Sequence[Path]) -> dict[int, dict[str, Any]]:
    import numpy as np

    values: dict[int, dict[str, Any]] = {}
    for round_number, on_correct_path, q_values in _query(files, _Q_VALUES_SQL):
        label = ON_CORRECT_PATH if on_correct_path else OFF_CORRECT_PATH
        values.setdefault(round_number, {})[label] = np.asarray(q_values, dtype=float)
    return values


def _metric_order(metric: str) -> tuple[str, int, int, str]:
    """Sort `benchmark/mode` keys by benchmark, then greedy, maj@K, ppm@K (by K), anything else."""
    benchmark, _, mode = metric.rpartition("/")
    family, _, k = mode.partition("@")
    rank = {"greedy": 0, "maj": 1, "ppm": 2, "mcts": 3}.get(family, 4)
    return benchmark, rank, int(k) if k.isdigit() else 0, mode


def _metrics(rounds: Sequence[RoundFigures]) -> list[str]:
    return sorted({metric for figures in rounds for metric in figures.accuracy}, key=_metric_order)


def _level_order(level: str) -> tuple[int, float, str]:
    try:
        return 0, float(level), level
    except ValueError:
        return 1, 0.0, level


# --- plots -----------------------------------------------------------------------------------------


def _render(title: str, caption: str, draw: Callable[[Any], None] | None, size: tuple[float, float],
            note: str) -> Plot:
    """A plot drawn by `draw(figure)` on an Agg canvas (no display, no global pyplot state)."""
    if draw is None:
        return Plot(title, caption, None, note)
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_PLOT_STYLE):
        figure = Figure(figsize=size, dpi=_DPI, layout="constrained")
        FigureCanvasAgg(figure)
        draw(figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})
    return Plot(title, caption, buffer.getvalue())


def _round_axis(axes: Any, rounds: Sequence[int]) -> None:
    axes.set_xticks(list(rounds))
    axes.set_xlabel("round")


def _accuracy_plot(data: RunData) -> Plot:
    metrics = _metrics(data.rounds)
    benchmarks = sorted({metric.rpartition("/")[0] for metric in metrics})
    modes = sorted({metric.rpartition("/")[2] for metric in metrics}, key=lambda mode: _metric_order("/" + mode))

    def draw(figure: Any) -> None:
        import matplotlib

        colors = matplotlib.colormaps["tab10"]
        styles = ["-", "--", ":", "-."]
        axes = figure.subplots()
        top = 0.0
        for metric in metrics:
            benchmark, _, mode = metric.rpartition("/")
            points = [(f.round, 100 * f.accuracy[metric]) for f in data.rounds if metric in f.accuracy]
            xs, ys = zip(*points)
            top = max(top, *ys)
            axes.plot(xs, ys, marker="o", clip_on=False, color=colors(modes.index(mode) % 10),
                      linestyle=styles[benchmarks.index(benchmark) % len(styles)],
                      label=mode if len(benchmarks) == 1 else metric)
        _round_axis(axes, [f.round for f in data.rounds])
        axes.set_ylabel("held-out accuracy (%)")
        axes.set_ylim(0, min(100.0, top * 1.15 + 5))
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0),
                    title=benchmarks[0] if len(benchmarks) == 1 else None)

    return _render(
        "Accuracy by round", "Held-out accuracy after each round, one line per evaluation mode"
        + (" and benchmark (line style)." if len(benchmarks) > 1 else "."),
        draw if metrics else None, (8.5, 4.0), "No round has evaluation results.",
    )


def _level_plot(data: RunData) -> Plot:
    searched = [f for f in data.rounds if f.solved_by_level]
    levels = sorted({level for f in searched for level in f.solved_by_level}, key=_level_order)

    def draw(figure: Any) -> None:
        import matplotlib
        import numpy as np

        colors = matplotlib.colormaps["viridis"]
        axes = figure.subplots()
        width = 0.8 / len(searched)
        label_bars = len(searched) * len(levels) <= 30
        for index, figures in enumerate(searched):
            counts = [figures.solved_by_level.get(level, [0, 0]) for level in levels]
            rates = [100 * solved / total if total else 0.0 for solved, total in counts]
            bars = axes.bar(np.arange(len(levels)) + (index - (len(searched) - 1) / 2) * width, rates, width,
                            color=colors(index / max(len(searched) - 1, 1) * 0.85), label=f"round {figures.round}")
            if label_bars:
                axes.bar_label(bars, [f"{solved}/{total}" if total else "" for solved, total in counts],
                               fontsize=7, padding=1)
        axes.set_xticks(np.arange(len(levels)), [f"level {level}" for level in levels])
        axes.grid(False, axis="x")
        axes.set_ylabel("problems solved by search (%)")
        axes.set_ylim(0, 108)
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))

    return _render(
        "Solve rate by difficulty", "Share of each level's training problems for which the round's search "
        "found a correct answer (labels: solved/searched).",
        draw if searched else None, (8.5, 4.0), "No round has searched problems yet (round 0 is the bootstrap).",
    )


def _q_value_plot(data: RunData) -> Plot:
    rounds = sorted(number for number, values in data.q_values.items() if values)
    rows = -(-len(rounds) // 3)  # at most three panels a row, spread evenly over the rows
    columns = -(-len(rounds) // rows) if rounds else 0
    groups = ((OFF_CORRECT_PATH, "#c0504d"), (ON_CORRECT_PATH, "#2e8b57"))

    def draw(figure: Any) -> None:
        import numpy as np
        from matplotlib.patches import Patch

        values = [array for number in rounds for array in data.q_values[number].values() if array.size]
        low = min(-1.0, *(float(array.min()) for array in values))
        high = max(1.0, *(float(array.max()) for array in values))
        bins = np.linspace(low, high, 41)
        grid = figure.subplots(rows, columns, squeeze=False)
        for axes, number in zip(grid.flat, rounds):
            counts = {label: data.q_values[number].get(label, np.empty(0)) for label, _ in groups}
            for label, color in groups:
                if counts[label].size:
                    axes.hist(counts[label], bins=bins, weights=np.full(counts[label].size, 100 / counts[label].size),
                              color=color, alpha=0.6)
            total = sum(array.size for array in counts.values())
            axes.set_title(f"round {number}: {total:,} visited steps, "
                           f"{100 * counts[ON_CORRECT_PATH].size / total:.0f}% on a correct path")
            axes.set_xlim(low, high)
            axes.set_xlabel("Q-value")
            axes.set_ylabel("share of group (%)")
        for axes in list(grid.flat)[len(rounds):]:
            axes.set_visible(False)
        figure.legend([Patch(color=color, alpha=0.6) for _, color in groups], [label for label, _ in groups],
                      loc="outside lower center", ncols=2)

    return _render(
        "Q-values of the search trees", "Distribution of the MCTS Q-values of the visited step nodes, split by "
        "whether a correct answer lies below the step; each group sums to 100%.",
        draw if rounds else None, (4.2 * columns + 0.5, 3.2 * rows + 0.5), "No search trees with visited step nodes.",
    )


def _cost_plot(data: RunData) -> Plot:
    timed = [f for f in data.rounds if f.wall_s is not None]
    token_metrics = sorted({metric for counts in data.eval_tokens.values() for metric in counts}, key=_metric_order)
    minutes = any(f.wall_s > 120 for f in timed)

    def draw(figure: Any) -> None:
        panels = figure.subplots(1, 2 if token_metrics else 1, squeeze=False)[0]
        wall = panels[0]
        wall.bar([f.round for f in timed], [f.wall_s / (60 if minutes else 1) for f in timed], color="#4c72b0")
        _round_axis(wall, [f.round for f in timed])
        wall.set_ylabel(f"wall time ({'min' if minutes else 's'})")
        wall.set_title("round wall time")
        if token_metrics:
            tokens = panels[1]
            for metric in token_metrics:
                points = [(number, counts[metric]) for number, counts in sorted(data.eval_tokens.items())
                          if metric in counts]
                tokens.plot(*zip(*points), marker="o", label=metric)
            _round_axis(tokens, sorted(data.eval_tokens))
            tokens.set_ylabel("tokens generated")
            tokens.set_title("evaluation tokens")
            tokens.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))

    return _render(
        "Cost", "Wall time of each round (all stages) and tokens generated by its held-out evaluation per mode.",
        draw if timed else None, (9.0 if token_metrics else 5.0, 3.5), "No round recorded its wall time.",
    )


# --- HTML ------------------------------------------------------------------------------------------

_CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1f2933;
       background: #f5f7fa; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 48px; }
h1 { margin: 0 0 4px; font-size: 28px; } h2 { font-size: 19px; margin: 0 0 10px; }
.sub { color: #616e7c; margin-bottom: 20px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 24px; }
.card { background: #fff; border-radius: 10px; padding: 12px 16px; box-shadow: 0 1px 3px rgba(0,0,0,.08);
        min-width: 150px; }
.card .label { color: #616e7c; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; } .card .delta { font-size: 13px; }
.up { color: #2e7d32; } .down { color: #c62828; }
section { background: #fff; border-radius: 10px; padding: 18px 20px; margin-bottom: 20px;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { padding: 6px 10px; text-align: right; border-bottom: 1px solid #e4e7eb; vertical-align: top; }
th { background: #f0f4f8; font-weight: 600; } tr:nth-child(even) td { background: #fafbfc; }
td.gate { text-align: left; min-width: 260px; } .reason { color: #616e7c; font-size: 12px; }
.badge { display: inline-block; border-radius: 9px; padding: 0 8px; font-size: 12px; font-weight: 600; }
.pass { background: #e3f4e4; color: #2e7d32; } .fail { background: #fde2e1; color: #c62828; }
.none { background: #eceff1; color: #616e7c; }
figure { margin: 0; } img { max-width: 100%; height: auto; } figcaption, .note { color: #616e7c; font-size: 13px; }
"""


def render_html(data: RunData, plots: Sequence[Plot]) -> str:
    """The report page: header, headline cards, the per-round table, then the plots."""
    rounds = data.rounds
    span = f"{rounds[0].round}–{rounds[-1].round}" if rounds else "none recorded"
    total_wall = sum(f.wall_s or 0.0 for f in rounds)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Kaizen run {escape(data.run)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>Run {escape(data.run)}</h1>",
        f'<div class="sub">{len(rounds)} round{"s" if len(rounds) != 1 else ""} ({span}) · wall time of the rounds '
        f"{_duration(total_wall)} · generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</div>",
        _cards(rounds), _rounds_table(rounds),
    ]
    for plot in plots:
        body = (f'<img alt="{escape(plot.title)}" src="data:image/png;base64,{base64.b64encode(plot.png).decode()}">'
                f"<figcaption>{escape(plot.caption)}</figcaption>" if plot.png is not None
                else f'<p class="note">{escape(plot.note)}</p>')
        parts.append(f"<section><figure><h2>{escape(plot.title)}</h2>{body}</figure></section>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _cards(rounds: Sequence[RoundFigures]) -> str:
    """Headline figures: each metric of the last round and its change since the first round that has it."""
    if not rounds:
        return ""
    cards = []
    last = rounds[-1]
    for metric in _metrics([last]):
        first = next(f for f in rounds if metric in f.accuracy)
        change = 100 * (last.accuracy[metric] - first.accuracy[metric])
        delta = (f'<div class="delta {"up" if change > 0 else "down" if change < 0 else ""}">{change:+.1f} points '
                 f"since round {first.round}</div>" if first is not last else "")
        cards.append(_card(f"{metric} · round {last.round}", _percent(last.accuracy[metric]), delta))
    passed = sum(1 for f in rounds if f.gate_passed)
    cards.append(_card("gates passed", f"{passed} / {len(rounds)}"))
    return f'<div class="cards">{"".join(cards)}</div>'


def _card(label: str, value: str, extra: str = "") -> str:
    return f'<div class="card"><div class="label">{escape(label)}</div><div class="value">{value}</div>{extra}</div>'


def _rounds_table(rounds: Sequence[RoundFigures]) -> str:
    metrics = _metrics(rounds)
    headers = ["round", *metrics, "search solved", "pairs", "SFT examples", "wall time", "gate"]
    lines = ["<section><h2>Rounds</h2><table><thead><tr>"
             + "".join(f"<th>{escape(header)}</th>" for header in headers) + "</tr></thead><tbody>"]
    for f in rounds:
        solved = _percent(f.solved_share) if f.solved_share is not None else "–"
        if f.trees is not None and f.trees_solved is not None:
            solved += f' <span class="reason">({f.trees_solved:,}/{f.trees:,})</span>'
        badge = {True: ("pass", "passed"), False: ("fail", "failed"), None: ("none", "not decided")}[f.gate_passed]
        cells = [str(f.round), *(_percent(f.accuracy.get(metric)) for metric in metrics), solved,
                 _count(f.pairs), _count(f.sft_examples), _duration(f.wall_s)]
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells)
                     + f'<td class="gate"><span class="badge {badge[0]}">{badge[1]}</span> '
                     f'<span class="reason">{escape(f.gate_reason)}</span></td></tr>')
    lines.append("</tbody></table></section>")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
