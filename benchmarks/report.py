"""Turning a benchmark result into ratios, a terminal table, a Markdown section, JSON and plots."""

from __future__ import annotations

import json
from pathlib import Path

MIB = 2**20


def _timed(row: dict) -> bool:
    return row.get("fwdbwd_ms") is not None and row.get("timing_valid", True)


def _usable(row: dict) -> bool:
    return _timed(row) and not row["status"].startswith(("FAIL", "error"))


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def matmul_peak(result: dict, tokens: int) -> float | None:
    """The best GEMM throughput seen at ``tokens`` in this run (reference job and every provider's process)."""
    seen = [result.get("matmul_peak", {}).get(str(tokens), {}).get("tflops")]
    seen += [r.get("matmul_peak_tflops") for r in result["rows"] if r["tokens"] == tokens]
    return max((x for x in seen if x), default=None)


def add_ratios(result: dict) -> None:
    """Add TFLOP/s (8NHV), % of the measured matmul peak, and speed/memory ratios vs naive and vs the best peer
    (the fastest / leanest peer whose check did not fail) to every timed row; record the best peers."""
    result["best_peer"] = {}
    for tokens in result["config"]["tokens"]:
        group = [r for r in result["rows"] if r["tokens"] == tokens]
        usable = [r for r in group if _usable(r)]
        naive = next((r for r in usable if r["family"] == "naive"), None)
        peers = [r for r in usable if r["family"] == "peer"]
        fast = min(peers, key=lambda r: r["fwdbwd_ms"], default=None)
        lean = min((r for r in peers if r.get("peak_bytes") is not None), key=lambda r: r["peak_bytes"], default=None)
        result["best_peer"][str(tokens)] = {"time": fast and fast["provider"], "memory": lean and lean["provider"]}
        peak = matmul_peak(result, tokens)
        for row in filter(_timed, group):
            t, mem = row["fwdbwd_ms"], row.get("peak_bytes")
            row["tflops"] = row["flops"] / (t * 1e-3) / 1e12 if row.get("flops") else None
            row["pct_peak"] = 100 * row["tflops"] / peak if peak and row["tflops"] else None
            row["x_naive"] = _ratio(naive and naive["fwdbwd_ms"], t)
            row["x_peer"] = _ratio(fast and fast["fwdbwd_ms"], t)
            row["mem_x_naive"] = _ratio(naive and naive.get("peak_bytes"), mem)
            row["mem_x_peer"] = _ratio(lean and lean["peak_bytes"], mem)


def failures(result: dict) -> list[dict]:
    """Rows whose correctness check failed."""
    return [r for r in result["rows"] if r["status"].startswith("FAIL")]


# ---------------------------------------------------------------- formatting


def _num(value: float | None, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "ms":
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    if kind == "x":
        return f"{value:.2f}×"
    if kind == "mib":
        return f"{value / MIB:.1f}"
    if kind == "err":
        return f"{value:.1e}"
    if kind == "pct":
        return f"{value:.0f}%"
    return f"{value:.3g}"


def render_table(headers: list[str], rows: list[list[str]], markdown: bool) -> str:
    """A plain aligned table, or a GitHub Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def _status(row: dict) -> str:
    status = row["status"]
    return "FAIL" if status.startswith("FAIL") else status.split(" ")[0]


def _main_rows(result: dict, tokens: int) -> tuple[list[list[str]], list[str]]:
    rows, notes = [], []
    for row in (r for r in result["rows"] if r["tokens"] == tokens):
        details = [row["reason"]] if row.get("reason") else row.get("notes", [])
        if row["status"].startswith("FAIL"):
            details.insert(0, row["status"])
        marks = ""
        for text in details:
            if text not in notes:
                notes.append(text)
            marks += f"[{notes.index(text) + 1}]"
        errs = row.get("errors") or {}
        # interpreted runs: numbers in parentheses, meaningless as timings or memory
        shown = (lambda text: text) if _timed(row) or row.get("fwdbwd_ms") is None else (lambda text: f"({text})")
        rows.append(
            [
                row["provider"],
                _status(row) + marks,
                *(shown(_num(row.get(k), "ms")) for k in ("fwd_ms", "bwd_ms", "fwdbwd_ms")),
                _num(row.get("x_naive"), "x"),
                _num(row.get("x_peer"), "x"),
                shown(_num(row.get("peak_bytes"), "mib")),
                _num(row.get("mem_x_naive"), "x"),
                _num(row.get("mem_x_peer"), "x"),
                _num(row.get("tflops"), "g"),
                _num(row.get("pct_peak"), "pct"),
                _num(errs.get("loss"), "err"),
                _num(errs.get("grad_hidden"), "err"),
                _num(errs.get("grad_weight"), "err"),
            ]
        )
    return rows, [f"[{i}] {text}" for i, text in enumerate(notes, 1)]


MAIN_HEADERS = [
    "provider", "check", "fwd ms", "bwd ms", "fwd+bwd ms", "speed ×naive", "×best peer", "peak MiB", "mem ×naive",
    "×best peer", "TFLOP/s", "% matmul", "err loss", "err dH", "err dW",
]  # fmt: skip


def _sweep(result: dict, markdown: bool) -> str:
    sizes = result["config"]["tokens"]
    names = list(dict.fromkeys(r["provider"] for r in result["rows"]))
    cell = {(r["provider"], r["tokens"]): r for r in result["rows"]}
    body = []
    for name in names:
        cells = [cell.get((name, t), {}) for t in sizes]
        if not any(_timed(c) for c in cells):
            continue
        body.append(
            [name]
            + [_num(c.get("fwdbwd_ms"), "ms") if _timed(c) else "—" for c in cells]
            + [_num(c.get("peak_bytes"), "mib") if _timed(c) else "—" for c in cells]
        )
    headers = ["provider"] + [f"{t} tok ms" for t in sizes] + [f"{t} tok MiB" for t in sizes]
    return render_table(headers, body, markdown)


def _header(result: dict) -> list[str]:
    cfg, machine = result["config"], result["machine"]
    largest = cfg["problems"][-1]
    soft = f", soft-cap {largest['softcap']:g}" if largest.get("softcap") else ""
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['torch_threads']} threads"
    load = machine.get("load_avg_1m")
    busy = load is not None and load > (machine.get("logical_cpus") or 1)
    peak = matmul_peak(result, cfg["tokens"][-1])
    lines = [
        f"preset {cfg['preset']}: H={largest['hidden']}, V={largest['vocab']}{soft}, {cfg['dtype']}, {cfg['device']} "
        f"({where}); tokens {cfg['tokens']} as B×T = "
        + ", ".join(f"{p['batch']}×{p['seq_len']}" for p in cfg["problems"]),
        f"torch {machine['versions'].get('torch')}, triton {machine['versions'].get('triton')}, "
        f"liger-kernel {machine['versions'].get('liger-kernel')}, cut-cross-entropy "
        f"{machine['versions'].get('cut-cross-entropy')}; load avg {load if load is None else round(load, 2)}"
        + (" — the machine is busy: timings are noisy" if busy else ""),
        "times are medians of forward, backward and forward+backward; peak = memory above the inputs during one "
        + ("step (CUDA max_memory_allocated)" if cfg["device"].startswith("cuda") else "step (RSS high-water mark)"),
        f"errors: relative to a {', '.join(sorted(set(result.get('reference_precision', {}).values()))) or '—'} "
        f"reference; check tolerance {cfg['tolerance']:g}; TFLOP/s counts 8·N·H·V over scored tokens"
        + (f"; matmul peak {peak:.3g} TFLOP/s (best GEMM of the lm-head's shape seen in this run)" if peak else ""),
    ]
    best = result.get("best_peer", {}).get(str(cfg["tokens"][-1]), {})
    lines.append(f"best peer at {cfg['tokens'][-1]} tokens: time {best.get('time')}, memory {best.get('memory')}")
    return lines


def _body(result: dict, markdown: bool) -> str:
    tokens = result["config"]["tokens"][-1]
    rows, notes = _main_rows(result, tokens)
    parts = [
        f"**{tokens} tokens**\n" if markdown else f"{tokens} tokens",
        render_table(MAIN_HEADERS, rows, markdown),
    ]
    parts += ["", *(f"- {n}" if markdown else n for n in notes)] if notes else []
    if len(result["config"]["tokens"]) > 1:
        parts += ["", "fwd+bwd median and peak memory by size:", "", _sweep(result, markdown)]
    return "\n".join(parts)


def terminal(result: dict) -> str:
    """The readable table printed at the end of a run."""
    return "\n".join(_header(result)) + "\n\n" + _body(result, markdown=False)


def markdown_section(result: dict) -> str:
    """A dated Markdown section for RESULTS.md."""
    cfg = result["config"]
    lines = [
        f"## {result['created'][:10]} — {cfg['preset']}, {cfg['dtype']}, {cfg['device']}",
        "",
        f"`{result.get('command', 'python benchmarks/loss_bench.py')}` ({result['elapsed_s']:.0f} s, "
        f"git {result['machine'].get('git')})",
        "",
        *(f"- {line}" for line in _header(result)),
        "",
        _body(result, markdown=True),
        "",
    ]
    return "\n".join(lines)


def append_markdown(result: dict, path: Path) -> None:
    """Append :func:`markdown_section` to ``path`` (created with a title when missing)."""
    title = "# Benchmark results\n\nSections appended by `python benchmarks/loss_bench.py --markdown`.\n"
    text = path.read_text() if path.exists() else title
    path.write_text(text.rstrip("\n") + "\n\n" + markdown_section(result))


# ---------------------------------------------------------------- files


def plot(result: dict, path: Path) -> Path | None:
    """Forward+backward time and peak memory against tokens, one line per provider (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["provider"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["provider"] == name and _timed(r)]
        if not rows:
            continue
        style = "-" if rows[0]["family"] == "ours" else "--"
        xs = [r["tokens"] for r in rows]
        ax_t.plot(xs, [r["fwdbwd_ms"] for r in rows], style, marker="o", label=name)
        mem = [(r["tokens"], r["peak_bytes"] / MIB) for r in rows if r.get("peak_bytes") is not None]
        if mem:
            ax_m.plot(*zip(*mem, strict=True), style, marker="o", label=name)
    cfg = result["config"]
    title = f"{cfg['preset']} · {cfg['dtype']} · {result['machine'].get('gpu') or cfg['device']}"
    for ax, label in ((ax_t, "forward+backward median (ms)"), (ax_m, "peak memory above inputs (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens (B×T)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title, fontsize=9)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(result: dict, path: Path) -> Path:
    """``result`` as JSON at ``path``, replaced atomically (a reader never sees half a file)."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(result, indent=1, default=str))
    partial.replace(path)
    return path


def write_outputs(result: dict, stem: Path, *, plot_png: bool = True) -> list[Path]:
    """``stem``.json (everything), ``stem``.md (the section) and ``stem``.png (the plot)."""
    paths = [write_json(result, stem.with_suffix(".json")), stem.with_suffix(".md")]
    paths[1].write_text(markdown_section(result))
    if plot_png and any(_timed(r) for r in result["rows"]):
        png = plot(result, stem.with_suffix(".png"))
        paths += [png] if png else []
    return paths
