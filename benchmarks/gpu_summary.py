"""The short summary of a ``benchmarks/gpu_check.sh`` work folder (what the device's output tail shows, and
summary.txt next to the archive): the environment, each step's status, the pytest counts and failures, the Triton
sweep table with the fused-loss verdict, and one compact table per loss_bench preset. Partial folders (a step
stopped at its limit) summarise what is there.

    python benchmarks/gpu_summary.py WORK_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

MAX_FAILURES = 8


def _lines(path: Path, limit: int | None = None) -> list[str]:
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return lines if limit is None else lines[:limit]


def pytest_summary(log: Path) -> list[str]:
    """The final counts line and the first failures of a pytest log (collect-only: the selection count)."""
    lines = _lines(log)
    pattern = re.compile(r"\d+ (passed|failed|errors?|skipped|tests? collected|selected)")
    counts = [line.strip("= ") for line in lines if pattern.search(line)]
    failures = [line for line in lines if line.startswith(("FAILED ", "ERROR "))][:MAX_FAILURES]
    return ["pytest counts: " + (counts[-1] if counts else f"no summary line ({len(lines)} lines of log)"), *failures]


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def sweep_summary(path: Path) -> list[str]:
    """The sweep's rows (one per variant) and the verdict on ``fused_sppo_loss``."""
    rows = [json.loads(line) for line in _lines(path) if line.startswith("{")]
    if not rows:
        return []
    out = ["sweep: variant | fwd ms | fwd+bwd ms | peak MiB (formula) | deterministic | max diff"]
    for r in rows:
        formula = sum(r.get("formula_mib", {}).values()) + r.get("gradients_mib", 0.0)
        diff = max(r["diff_vs_default"].values()) if r.get("diff_vs_default") else None
        status = r.get("error", "")[:60] or str(r.get("deterministic"))
        out.append(
            f"  {r['preset']} {r['variant']} | {_ms(r.get('forward_ms'))} | {_ms(r.get('fwd_bwd_ms'))} | "
            f"{_ms(r.get('peak_extra_mib'))} ({formula:.0f}) | {status} | {'—' if diff is None else f'{diff:.1e}'}"
        )
    by_name = {r["variant"]: r for r in rows}
    default, fused = by_name.get("default", {}), by_name.get("fused-loss", {})
    if rows[0].get("device") == "cpu":
        out.append("verdict fused_sppo_loss: none (Triton interpreter: the timings mean nothing)")
    elif default.get("fwd_bwd_ms") and fused.get("fwd_bwd_ms"):
        ratio = default["fwd_bwd_ms"] / fused["fwd_bwd_ms"]
        verdict = "make it the default" if ratio > 1.0 else "keep the recomputing default"
        out.append(f"verdict fused_sppo_loss: {ratio:.2f}x the default's speed -> {verdict}")
    return out


def bench_summary(path: Path) -> list[str]:
    """One line per provider of a loss_bench JSON (complete or not): status, times, memory, errors."""
    data = json.loads(path.read_text())
    cfg = data["config"]
    head = f"bench {cfg['preset']} {cfg['dtype']} {cfg['device']} {cfg['tokens'][-1]} tokens"
    out = [head + ("" if data.get("complete") else " (incomplete)") + ": provider | check | fwd+bwd ms | MiB | err dW"]
    for row in data["rows"]:
        errs = row.get("errors") or {}
        peak = row.get("peak_bytes")
        err_w = errs.get("grad_weight")
        status = row["status"] if not row.get("reason") else f"{row['status']}: {row['reason'][:70]}"
        out.append(
            f"  {row['provider']} | {status} | {_ms(row.get('fwdbwd_ms'))} | "
            f"{'—' if peak is None else f'{peak / 2**20:.0f}'} | {'—' if err_w is None else f'{err_w:.1e}'}"
        )
    return out


def summary(work: Path) -> str:
    lines = _lines(work / "environment.txt", 8) + _lines(work / "wheels.log", 4) + _lines(work / "steps.txt")
    if (work / "pytest.log").exists():
        lines += pytest_summary(work / "pytest.log")
    lines += sweep_summary(work / "sweep" / "triton_sweep.jsonl")
    for path in sorted(work.glob("bench-*/loss_bench_*.json")):
        lines += bench_summary(path)
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1])))
