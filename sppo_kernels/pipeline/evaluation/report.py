"""The evaluation's reports, from the rows of every finished judge: ``eval.json``, one model-card table per judge
(``eval.md``, under notes on the prompt set from ``eval/settings.json``) and the win rates by iteration
(``eval.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sppo_kernels.pipeline.core import schema
from sppo_kernels.pipeline.core.store import atomic_path, read_json, write_json, write_text
from sppo_kernels.pipeline.evaluation.prompt_sets import shown


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def judges(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The judges of ``rows``, in the order of their first row."""
    return list(dict.fromkeys(row["judge"] for row in rows))


def judge_table(rows: Sequence[dict[str, Any]], judge: str) -> list[str]:
    """The lines of ``judge``'s table, laid out like the model card's: iteration | LC win rate | win rate | avg
    length | wins / ties / losses."""
    judged = sorted((r for r in rows if r["judge"] == judge), key=lambda r: r["iteration"])
    lines = [
        "| iteration | LC win rate | win rate [95% CI] | avg length (chars) | avg length (tokens) | W / T / L |",
        "|---|---|---|---|---|---|",
    ]
    for r in judged:
        name = "base" if r["iteration"] == 0 else schema.iteration_name(r["iteration"])
        low, high = r["win_rate_ci"]
        lines.append(
            f"| {name} | {_percent(r['lc_win_rate'])} | {_percent(r['win_rate'])} "
            f"[{_percent(low)}, {_percent(high)}] | {r['avg_length_chars']:.0f} | {r['avg_length_tokens']:.1f} "
            f"| {r['wins']} / {r['ties']} / {r['losses']} |"
        )
    return lines


def markdown_table(rows: Sequence[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """``eval.md``: ``notes`` (one line each, e.g. eval prompts the policies were trained on), then one table per
    judge, each under a line naming the judge and its number of prompts."""
    out = [*(f"note: {note}" for note in notes), *([""] if notes else [])]
    for judge in judges(rows):
        n = next(r["n"] for r in rows if r["judge"] == judge)
        out += [
            f"judge: {judge}, n = {n} prompts, baseline = iteration 0 unless set; rates in %, "
            "95% interval by bootstrap over prompts",
            "",
            *judge_table(rows, judge),
            "",
        ]
    return "\n".join(out)


def plot_win_rates(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """PNG of the win rate (with its 95% interval) and the LC win rate by iteration, one colour per judge."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    for index, judge in enumerate(judges(rows)):
        judged = sorted((r for r in rows if r["judge"] == judge), key=lambda r: r["iteration"])
        its = [r["iteration"] for r in judged]
        rate = np.array([100 * r["win_rate"] for r in judged])
        ci = np.array([[100 * r["win_rate_ci"][0] for r in judged], [100 * r["win_rate_ci"][1] for r in judged]])
        color = f"C{index}"
        ax.errorbar(its, rate, yerr=[rate - ci[0], ci[1] - rate], color=color, marker="o", capsize=3, label=judge)
        ax.plot(its, [100 * r["lc_win_rate"] for r in judged], color=color, ls="--", label=f"{judge} (LC)")
    ax.axhline(50, color="grey", lw=0.8)
    ax.set(xlabel="SPPO iteration (0 = base)", ylabel="win rate vs baseline (%)", title="win rate by iteration")
    ax.set_xticks(sorted({r["iteration"] for r in rows}))
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def row_order(row: dict[str, Any]) -> tuple[int, str]:
    """Rows of ``eval.json`` and tables of ``eval.md`` come by iteration, then judge."""
    return row["iteration"], row["judge"]


def finished_rows(work_dir: Path) -> list[dict[str, Any]]:
    """The ``eval.json`` rows of every judge whose evaluation is finished in ``work_dir``, in :func:`row_order`."""
    markers = (work_dir / schema.MARKER_DIR).glob(f"{schema.EVALUATE_STAGE}-*.json")
    return sorted((row for marker in markers for row in read_json(marker)["rows"]), key=row_order)


def report_notes(settings: dict[str, Any]) -> list[str]:
    """The lines above the tables of ``eval.md``: what the reader must know about the prompt set."""
    notes = []
    if settings.get("repeated_prompts"):
        repeated = settings["repeated_prompts"]
        notes.append(f"{len(repeated)} repeated eval prompts were dropped (ids {shown(repeated)}): each counts once.")
    if settings.get("training_overlap"):
        overlap = settings["training_overlap"]
        notes.append(
            f"{len(overlap)} of the eval prompts are training prompts of the run (ids {shown(overlap)}): the "
            "policies were trained on them."
        )
    return notes


def write_reports(out: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``eval.json``, ``eval.md`` and ``eval.png`` in ``out`` from ``rows`` (and ``eval/settings.json``)."""
    settings = read_json(out / schema.EVAL_DIR / schema.EVAL_SETTINGS)
    write_json(schema.EVAL_JSON.path(out), list(rows))
    write_text(out / schema.EVAL_TABLE, markdown_table(rows, report_notes(settings)))
    plot_win_rates(rows, out / schema.EVAL_PLOT)
