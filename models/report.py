"""Human-readable round reports: the markdown a Prefect artifact shows for each round.

Pure text from a round's record and evaluation summary; the flows publish it, the demo's report
reuses the same tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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
