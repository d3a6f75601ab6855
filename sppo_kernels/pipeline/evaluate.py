"""``evaluate``: win rates of every iteration's policy against a baseline, judged pairwise, AlpacaEval 2.0-style.

For each policy (iteration 0 = the base model, then each ``iter<t>/model``) one response per held-out prompt is
generated with the generation stage's engine (vLLM on CUDA, else HF), with the paper's sampling (the generate
options' temperature/top_p, default 0.7/0.9) or greedily, and with the same seed for every policy. A pairwise
judge (PairRM through llm-blender by default; any :class:`~sppo_kernels.pipeline.rank.PairwiseScorer`) compares
it with the baseline's response to the same prompt in both orders, and the verdicts give, per iteration:

- the win rate (ties count ½) and its 95% interval (percentile bootstrap over prompts, seeded);
- the length-controlled win rate (a logistic GLM of the verdicts on the normalised length difference, predicted
  at zero length difference; :func:`lc_win_rate` and docs/evaluation.md hold the exact formula);
- the policy's average response length in characters and in tokens.

Layout of ``out`` (a run folder, or ``--out``)::

    eval.json                  [{"iteration", "judge", "n", "win_rate", "win_rate_ci", "lc_win_rate",
                                 "avg_length_tokens", "avg_length_chars"}, ...]
    eval.md                    one model-card table per judge;   eval.png   win rate by iteration
    eval/settings.json         policies, baseline, prompts and options (a rerun must match them)
    eval/iter<t>/outputs.jsonl {"id", "instruction", "output", "num_tokens", "finish_reason"} per prompt
    eval/iter<t>/model_outputs.json   the same in AlpacaEval's format (instruction, output, generator, dataset)
    eval/iter<t>/judgments-<judge>.jsonl   per prompt: both orders' logits, the preference and the outcome
    eval/stages/, eval/iter<t>/stages/, *_units/   completion markers and resumable partial work

Evaluation never trains or changes a model, and the judge sees only the prompt and the two responses.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sppo_kernels.pipeline import chat, generate
from sppo_kernels.pipeline.errors import PipelineError
from sppo_kernels.pipeline.fingerprint import (
    Fingerprint,
    content_identity,
    file_identity,
    model_identity,
    prompts_identity,
    stage_fingerprint,
)
from sppo_kernels.pipeline.modeling import ModelOptions
from sppo_kernels.pipeline.options import add_options, at_least, from_args, opt, validated
from sppo_kernels.pipeline.prompts import Prompt, PromptOptions, load_prompts
from sppo_kernels.pipeline.rank import PairRMScorer, PairwiseScorer, RankOptions, judge_identity
from sppo_kernels.pipeline.store import (
    atomic_path,
    begin_stage,
    chunks,
    mark_done,
    read_json,
    read_rows,
    remove_tree,
    run_units,
    settle_stale,
    stage_summary,
    write_json,
    write_jsonl,
    write_text,
)

STAGE = "evaluate"
EVAL_JSON = "eval.json"
TABLE = "eval.md"
PLOT = "eval.png"
WORK_DIR = "eval"
OUTPUTS = "outputs.jsonl"
MODEL_OUTPUTS = "model_outputs.json"
OUTPUT_KEYS = ("id", "instruction", "output", "num_tokens", "finish_reason")
JUDGMENT_KEYS = ("id", "outcome", "preference")
DEFAULT_JUDGE = "pairrm"
# The generation options that change an evaluated response (the HF batch size too: padding changes samples).
SAMPLING_FIELDS = ("temperature", "top_p", "max_new_tokens", "generation_backend", "generation_batch_size")
ROW_KEYS = (
    "iteration",
    "judge",
    "n",
    "win_rate",
    "win_rate_ci",
    "lc_win_rate",
    "avg_length_tokens",
    "avg_length_chars",
)
LC_L2 = 0.01  # ridge on (θ, φ): sklearn's C = 100 (AlpacaEval's default C); keeps separable data finite


@dataclass
class EvalOptions:
    """Evaluation against a baseline (``sppo-train eval``, or the ``evaluate`` stage of ``run``). None of these is
    part of a run's fingerprint: the evaluation never changes a trained model and checks its own settings
    (``eval/settings.json``)."""

    eval_prompts: str | None = opt(
        None,
        "held-out prompts, same formats as --prompts (--prompt-column/--prompt-split apply); with run, adds an "
        "evaluate stage after the last iteration",
        fingerprinted=False,
    )
    eval_max_prompts: int | None = opt(
        None, "use only the first N eval prompts", check=at_least(1), fingerprinted=False
    )
    eval_sampling: str = opt(
        "paper",
        "paper: sample with the generate options' temperature/top_p (the paper's 0.7/0.9); greedy: argmax decoding",
        ("paper", "greedy"),
        fingerprinted=False,
    )
    eval_seed: int = opt(
        0, "seed of the eval sampling (the same for every policy) and of the bootstrap", check=at_least(0),
        fingerprinted=False,
    )  # fmt: skip
    eval_bootstrap: int = opt(
        2000, "bootstrap resamples of the prompts for the 95%% interval", check=at_least(1), fingerprinted=False
    )
    eval_baseline: str | None = opt(None, "baseline model (default: the base policy, iteration 0)", fingerprinted=False)
    eval_shard_size: int = opt(64, "prompts per saved unit of work", check=at_least(1), fingerprinted=False)
    eval_dataset: str | None = opt(
        None, "'dataset' field of model_outputs.json (default: the eval prompts' name)", fingerprinted=False
    )


# --------------------------------------------------------------------------------------------- statistics


def outcome_of(preference: float) -> float:
    """A verdict from the both-orders preference logit: 1 (policy wins) if > 0, 0 if < 0, ½ on a tie."""
    return 1.0 if preference > 0 else 0.0 if preference < 0 else 0.5


def bootstrap_ci(outcomes: Sequence[float], *, resamples: int, seed: int, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean outcome: ``resamples`` resamples of the prompts with replacement
    (``numpy.random.default_rng(seed)``), then the (1 ± level)/2 quantiles of their means."""
    values = np.asarray(outcomes, dtype=np.float64)
    if values.size == 0:
        raise PipelineError("no outcomes to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def length_feature(policy_lengths: Sequence[float], baseline_lengths: Sequence[float]) -> np.ndarray:
    """AlpacaEval 2.0's length feature ``tanh(Δ_i / sd(Δ))`` with ``Δ_i = len(baseline_i) − len(policy_i)`` and
    ``sd`` the sample standard deviation (ddof 1); all zeros when ``sd`` is 0 (or there is one prompt)."""
    delta = np.asarray(baseline_lengths, dtype=np.float64) - np.asarray(policy_lengths, dtype=np.float64)
    sd = float(delta.std(ddof=1)) if delta.size > 1 else 0.0
    return np.tanh(delta / sd) if sd > 0 else np.zeros_like(delta)


def fit_length_glm(preferences: Sequence[float], feature: Sequence[float], *, l2: float = LC_L2) -> tuple[float, float]:
    """(θ, φ) minimising ``Σ_i −[p_i log σ(θ + φ x_i) + (1 − p_i) log σ(−θ − φ x_i)] + (l2/2)(θ² + φ²)``
    (damped Newton; soft labels p_i in [0, 1]). φ is 0 when every x_i is 0."""
    p = np.asarray(preferences, dtype=np.float64)
    x = np.asarray(feature, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], axis=1) if np.any(x != 0) else np.ones((x.size, 1))
    beta = np.zeros(design.shape[1])

    def objective(b: np.ndarray) -> float:
        z = design @ b
        return float(np.sum(np.logaddexp(0.0, -z) * p + np.logaddexp(0.0, z) * (1 - p)) + 0.5 * l2 * b @ b)

    current = objective(beta)
    for _ in range(200):
        q = _sigmoid(design @ beta)
        gradient = design.T @ (q - p) + l2 * beta
        hessian = (design * (q * (1 - q))[:, None]).T @ design + l2 * np.eye(design.shape[1])
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        scale = 1.0
        while scale > 1e-8:
            candidate = beta - scale * step
            value = objective(candidate)
            if value <= current + 1e-12:
                break
            scale /= 2
        beta, previous, current = candidate, current, value
        if np.max(np.abs(scale * step)) < 1e-10 or previous - current < 1e-14:
            break
    return float(beta[0]), float(beta[1]) if beta.size > 1 else 0.0


def lc_win_rate(
    preferences: Sequence[float],
    policy_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    *,
    l2: float = LC_L2,
) -> float:
    """Length-controlled win rate: σ(θ) of :func:`fit_length_glm` on :func:`length_feature`, i.e. the GLM's
    predicted preference when the policy's and the baseline's responses have the same length."""
    theta, _ = fit_length_glm(preferences, length_feature(policy_lengths, baseline_lengths), l2=l2)
    return float(_sigmoid(np.array(theta)))


def summarize(
    outcomes: Sequence[float],
    policy_outputs: Sequence[dict[str, Any]],
    baseline_outputs: Sequence[dict[str, Any]],
    *,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """The eval.json statistics of one (policy, judge): n, win rate, its interval, LC win rate, lengths."""
    chars = [len(row["output"]) for row in policy_outputs]
    return {
        "n": len(outcomes),
        "win_rate": float(np.mean(outcomes)),
        "win_rate_ci": bootstrap_ci(outcomes, resamples=resamples, seed=seed),
        "lc_win_rate": lc_win_rate(outcomes, chars, [len(row["output"]) for row in baseline_outputs]),
        "avg_length_tokens": float(np.mean([row["num_tokens"] for row in policy_outputs])),
        "avg_length_chars": float(np.mean(chars)),
    }


# --------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Policy:
    """One evaluated model: its iteration (0 = the base) and folder or hub name."""

    iteration: int
    path: str


def _generation_options(options: EvalOptions, generate_options: generate.GenerateOptions) -> generate.GenerateOptions:
    temperature = 0.0 if options.eval_sampling == "greedy" else generate_options.temperature
    top_p = 1.0 if options.eval_sampling == "greedy" else generate_options.top_p
    return dataclasses.replace(generate_options, num_responses=1, temperature=temperature, top_p=top_p)


def generate_outputs(
    model: str,
    prompts: Sequence[Prompt],
    folder: Path,
    options: EvalOptions,
    generate_options: generate.GenerateOptions,
    model_options: ModelOptions,
    *,
    generator: str,
    dataset: str,
    sampler: generate.Sampler | None = None,
) -> list[dict[str, Any]]:
    """One response per prompt from ``model`` (resumable units), written to ``outputs.jsonl`` and AlpacaEval's
    ``model_outputs.json`` in ``folder``; returns the rows of ``outputs.jsonl``. Earlier work in ``folder`` is
    reused only when its fingerprint (model, prompts, sampling, seed, shards, labels) matches."""
    sampling = _generation_options(options, generate_options)
    settings = {"seed": options.eval_seed, "shard_size": options.eval_shard_size, "dataset": dataset}
    settings |= {name: getattr(sampling, name) for name in SAMPLING_FIELDS}
    inputs = {
        "model": model_identity(model),
        "prompts": prompts_identity(prompts),
        "settings": content_identity(settings),
    }
    fingerprint = stage_fingerprint("eval-generate", inputs, model_options)
    if begin_stage(folder, "generate", fingerprint, quiet=True) is not None:
        return read_rows(folder / OUTPUTS, OUTPUT_KEYS)
    started = time.perf_counter()
    tokenizer = chat.load_tokenizer(model, trust_remote_code=model_options.trust_remote_code)
    prompt_ids = [chat.encode_prompt(tokenizer, p.messages) for p in prompts]
    engine = sampler

    def work(index: int, shard: Sequence[int]) -> list[dict[str, Any]]:
        nonlocal engine
        if engine is None:  # built lazily: a fully resumed policy loads no model
            engine = generate.make_sampler(model, sampling, tokenizer=tokenizer, model_options=model_options)
        samples = engine.sample([prompt_ids[i] for i in shard], generate.unit_seed(options.eval_seed, 0, index))
        if len(samples) != len(shard):
            raise PipelineError(f"the generation engine returned {len(samples)} responses for {len(shard)} prompts")
        return [
            {
                "id": prompts[i].id,
                "instruction": prompts[i].text,
                "output": s.text,
                "num_tokens": s.num_tokens - (s.finish_reason == "stop"),  # the end-of-turn token is not counted
                "finish_reason": s.finish_reason,
            }
            for i, s in zip(shard, samples, strict=True)
        ]

    shards = chunks(range(len(prompts)), options.eval_shard_size)
    results = run_units(
        folder / "generate_units", shards, work, fingerprint=fingerprint, desc=f"eval generate {folder.name}",
        weight=len,
    )  # fmt: skip
    rows = [row for shard in results for row in shard]
    write_jsonl(folder / OUTPUTS, rows)
    alpaca = [
        {"instruction": r["instruction"], "output": r["output"], "generator": generator, "dataset": dataset}
        for r in rows
    ]
    write_json(folder / MODEL_OUTPUTS, alpaca)
    seconds = round(time.perf_counter() - started, 2)
    summary = {"model": model, "prompts": len(rows), "seconds": seconds, "fingerprint": fingerprint.record}
    mark_done(folder, "generate", summary)
    return rows


# --------------------------------------------------------------------------------------------- judging


def judge_outputs(
    judge: PairwiseScorer,
    judge_name: str,
    policy_rows: Sequence[dict[str, Any]],
    baseline_rows: Sequence[dict[str, Any]],
    folder: Path,
    *,
    shard_size: int,
    where: str,
    fingerprint: Fingerprint,
) -> list[dict[str, Any]]:
    """Verdicts of ``judge`` on every (policy response, baseline response) pair, in both orders.

    The judge gets candidates ``[policy, baseline]`` and returns logits [n, 2, 2]; the preference is
    ``L[0][1] − L[1][0]`` (llm-blender's ``compare(mode="[A,B]+[B,A]")``: the policy's logit when shown first
    minus the baseline's when shown first), and the outcome is 1 / ½ / 0 as it is > 0 / 0 / < 0. Identical
    responses are a tie without asking the judge (as AlpacaEval does). Rows are written to
    ``judgments-<judge>.jsonl`` in ``folder``; earlier verdicts are reused only under the same ``fingerprint``.
    """
    marker = f"judge-{judge_name}"
    path = folder / f"judgments-{judge_name}.jsonl"
    if begin_stage(folder, marker, fingerprint, quiet=True) is not None:
        return read_rows(path, JUDGMENT_KEYS)
    pairs = list(zip(policy_rows, baseline_rows, strict=True))

    def work(_index: int, shard: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> list[dict[str, Any]]:
        asked = [(p, b) for p, b in shard if p["output"] != b["output"]]
        logits = np.zeros((0, 2, 2), dtype=np.float32)
        if asked:
            logits = np.asarray(
                judge.compare([p["instruction"] for p, _ in asked], [[p["output"], b["output"]] for p, b in asked])
            )
            if logits.shape != (len(asked), 2, 2):
                raise PipelineError(
                    f"judge {judge_name!r} returned logits of shape {logits.shape}, expected {(len(asked), 2, 2)}"
                )
        verdicts = {}
        for (p, _b), matrix in zip(asked, logits, strict=True):
            first, second = float(matrix[0][1]), float(matrix[1][0])
            if not (math.isfinite(first) and math.isfinite(second)):
                raise PipelineError(
                    f"judge {judge_name!r} returned a non-finite logit ({first}, {second}) for prompt id {p['id']} "
                    f"of {where}"
                )
            verdicts[p["id"]] = (first, second)
        rows = []
        for p, _b in shard:
            if p["id"] in verdicts:
                first, second = verdicts[p["id"]]
                preference = first - second
                rows.append({"id": p["id"], "logits": [first, second], "preference": preference})
            else:
                rows.append({"id": p["id"], "logits": None, "preference": 0.0, "identical": True})
            rows[-1]["outcome"] = outcome_of(rows[-1]["preference"])
        return rows

    results = run_units(
        folder / f"judge_units-{judge_name}",
        chunks(pairs, shard_size),
        work,
        fingerprint=fingerprint,
        desc=f"eval judge {judge_name} {folder.name}",
        weight=len,
    )
    rows = [row for shard in results for row in shard]
    write_jsonl(path, rows)
    outcomes = [row["outcome"] for row in rows]
    counts = {"wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0)}
    mark_done(folder, marker, {"pairs": len(rows), **counts, "fingerprint": fingerprint.record})
    return rows


# --------------------------------------------------------------------------------------------- reports


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def markdown_table(rows: Sequence[dict[str, Any]], details: dict[tuple[int, str], dict[str, Any]] | None = None) -> str:
    """One table per judge laid out like the model card's: iteration | LC win rate | win rate | avg length."""
    details = details or {}
    out = []
    for judge in dict.fromkeys(row["judge"] for row in rows):
        judged = sorted((r for r in rows if r["judge"] == judge), key=lambda r: r["iteration"])
        out += [
            f"judge: {judge}, n = {judged[0]['n']} prompts, baseline = iteration 0 unless set; rates in %, "
            "95% interval by bootstrap over prompts",
            "",
            "| iteration | LC win rate | win rate [95% CI] | avg length (chars) | avg length (tokens) | W / T / L |",
            "|---|---|---|---|---|---|",
        ]
        for r in judged:
            name = "base" if r["iteration"] == 0 else f"iter{r['iteration']}"
            counts = details.get((r["iteration"], judge))
            wtl = f"{counts['wins']} / {counts['ties']} / {counts['losses']}" if counts else "–"
            low, high = r["win_rate_ci"]
            out.append(
                f"| {name} | {_percent(r['lc_win_rate'])} | {_percent(r['win_rate'])} "
                f"[{_percent(low)}, {_percent(high)}] | {r['avg_length_chars']:.0f} | {r['avg_length_tokens']:.1f} "
                f"| {wtl} |"
            )
        out.append("")
    return "\n".join(out)


def plot_win_rates(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """PNG of the win rate (with its 95% interval) and the LC win rate by iteration, one colour per judge."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    for index, judge in enumerate(dict.fromkeys(row["judge"] for row in rows)):
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


# --------------------------------------------------------------------------------------------- the stage


def _settle_settings(work_dir: Path, fingerprint: Fingerprint, readable: dict[str, Any]) -> None:
    """Record the evaluation's fingerprint (and, for people, its ``readable`` settings) in ``work_dir``, or settle
    an earlier evaluation there made from other policies, prompts or settings: refused, or (``--discard-stale``)
    removed and redone. Only the fingerprint is compared (contents, not paths)."""
    path = work_dir / "settings.json"
    stored = read_json(path) if path.is_file() else None
    if stored is not None and settle_stale(
        f"the evaluation in {work_dir}", stored.get("fingerprint"), fingerprint, lambda: remove_tree(work_dir)
    ):
        return
    write_json(path, {**readable, "fingerprint": fingerprint.record})


def _check_tokenizer(model: str, model_options: ModelOptions) -> None:
    """A clear error when ``model`` has no usable tokenizer (transformers raises OSError or ValueError)."""
    try:
        chat.load_tokenizer(model, trust_remote_code=model_options.trust_remote_code)
    except ValueError as e:
        raise PipelineError(f"cannot load a tokenizer from {model!r}: {str(e).splitlines()[0]}") from e


def _judge_name(judge: Any) -> str:
    return str(getattr(judge, "name", None) or type(judge).__name__)


def evaluate(
    policies: Sequence[Policy],
    prompts_source: str,
    out: str | Path,
    options: EvalOptions,
    generate_options: generate.GenerateOptions | None = None,
    model_options: ModelOptions | None = None,
    rank_options: RankOptions | None = None,
    prompt_options: PromptOptions | None = None,
    *,
    judges: dict[str, PairwiseScorer] | None = None,
    samplers: dict[str, generate.Sampler] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Evaluate ``policies`` on the prompts of ``prompts_source`` against the baseline with each judge.

    ``judges`` maps a name to a scorer (default: ``{"pairrm": PairRM from rank_options}``, built lazily);
    ``samplers`` optionally maps a model path to a generation engine (tests). Returns the rows written to
    ``out/eval.json`` (rows of other judges already there are kept).
    """
    started = time.perf_counter()
    out = Path(out)
    generate_options = generate_options or generate.GenerateOptions()
    model_options = model_options or ModelOptions()
    rank_options = rank_options or RankOptions()
    prompt_options = dataclasses.replace(prompt_options or PromptOptions(), max_prompts=options.eval_max_prompts)
    for group in (options, generate_options, model_options, rank_options, prompt_options):
        validated(group)
    if not policies:
        raise PipelineError("evaluate: no policies to evaluate")
    if options.eval_bootstrap < 1 or options.eval_shard_size < 1:
        raise PipelineError("--eval-bootstrap and --eval-shard-size must be >= 1")
    prompts = load_prompts(prompts_source, prompt_options)
    if len({p.id for p in prompts}) != len(prompts):
        raise PipelineError(f"{prompts_source}: prompt ids are not unique")
    baseline = options.eval_baseline or next((p.path for p in policies if p.iteration == 0), None)
    if baseline is None:
        raise PipelineError("evaluate: no baseline (give --eval-baseline, or an iteration-0 policy)")
    for model in dict.fromkeys([baseline, *(p.path for p in policies)]):  # fail before any work
        _check_tokenizer(model, model_options)
    work_dir = out / WORK_DIR
    sampling = _generation_options(options, generate_options)
    dataset = options.eval_dataset or Path(prompts_source).stem
    identities = {f"iteration {p.iteration}": model_identity(p.path) for p in policies}
    identities |= {"baseline": model_identity(baseline), "prompts": prompts_identity(prompts)}
    settings = {"seed": options.eval_seed, "shard_size": options.eval_shard_size, "dataset": dataset}
    settings |= {name: getattr(sampling, name) for name in SAMPLING_FIELDS}
    readable = {
        "policies": [asdict(p) for p in policies],
        "baseline": baseline,
        "prompts": prompts_source,
        "options": asdict(options),
        "generate": asdict(sampling),
        "judge": asdict(rank_options),
    }
    fingerprint = stage_fingerprint(
        STAGE, {**identities, "settings": content_identity(settings)}, model_options
    )  # fmt: skip
    _settle_settings(work_dir, fingerprint, readable)
    folders: dict[str, Path] = {}  # model path -> folder of its outputs (a model listed twice is generated once)
    for p in policies:
        folders.setdefault(p.path, work_dir / f"iter{p.iteration}")
    folders.setdefault(baseline, work_dir / "baseline")
    outputs = {
        model: generate_outputs(
            model,
            prompts,
            folder,
            options,
            generate_options,
            model_options,
            generator=f"{out.resolve().name}-{folder.name}",
            dataset=dataset,
            sampler=(samplers or {}).get(model),
        )
        for model, folder in folders.items()
    }
    log(f"[{STAGE}] {len(prompts)} prompts x {len(folders)} models generated ({options.eval_sampling} decoding)")

    if judges is None:
        judges = {DEFAULT_JUDGE: _LazyPairRM(rank_options)}
    rows = []
    for name, judge in judges.items():
        for p in policies:
            compared = {
                "policy outputs": file_identity(folders[p.path] / OUTPUTS),
                "baseline outputs": file_identity(folders[baseline] / OUTPUTS),
                "judge": judge_identity(None if isinstance(judge, _LazyPairRM) else judge),
                "shards": content_identity(options.eval_shard_size),
            }
            verdicts = judge_outputs(
                judge,
                name,
                outputs[p.path],
                outputs[baseline],
                folders[p.path],
                shard_size=options.eval_shard_size,
                where=f"{prompts_source} (policy {p.path})",
                fingerprint=stage_fingerprint("eval-judge", compared, rank_options),
            )
            stats = summarize(
                [v["outcome"] for v in verdicts],
                outputs[p.path],
                outputs[baseline],
                resamples=options.eval_bootstrap,
                seed=options.eval_seed,
            )
            rows.append({"iteration": p.iteration, "judge": name, **stats})
        final = max((r for r in rows if r["judge"] == name), key=lambda r: r["iteration"])
        log(
            f"[{STAGE}] judge {name}: iteration {final['iteration']} wins {_percent(final['win_rate'])}% "
            f"(LC {_percent(final['lc_win_rate'])}%) against the baseline"
        )
    previous = read_json(out / EVAL_JSON) if (out / EVAL_JSON).is_file() else []
    all_rows = [r for r in previous if r.get("judge") not in judges] + rows
    counts = {}
    for r in all_rows:
        folder = folders.get(next((p.path for p in policies if p.iteration == r["iteration"]), ""))
        summary = stage_summary(folder, f"judge-{r['judge']}") if folder is not None else None
        if summary is not None and "wins" in summary:
            counts[(r["iteration"], r["judge"])] = summary
    write_json(out / EVAL_JSON, all_rows)
    write_text(out / TABLE, markdown_table(all_rows, counts))
    plot_win_rates(all_rows, out / PLOT)
    for name in judges:
        mark_done(work_dir, f"{STAGE}-{name}", {"rows": len(rows), "seconds": round(time.perf_counter() - started, 2)})
    log(f"[{STAGE}] {len(rows)} rows, {time.perf_counter() - started:.1f}s -> {out / EVAL_JSON} (+ {TABLE}, {PLOT})")
    return all_rows


class _LazyPairRM:
    """PairRM built at the first comparison (a fully resumed evaluation loads no judge)."""

    name = DEFAULT_JUDGE

    def __init__(self, options: RankOptions) -> None:
        self.options = options
        self.scorer: PairRMScorer | None = None

    def compare(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]]) -> np.ndarray:
        if self.scorer is None:
            self.scorer = PairRMScorer(
                self.options.ranker,
                device=self.options.ranker_device,
                batch_size=self.options.rank_batch_size,
                source_max_length=self.options.source_max_length,
                candidate_max_length=self.options.candidate_max_length,
            )
        return self.scorer.compare(prompts, candidates)


def run_policies(base_model: str, run_dir: str | Path, iterations: int | None = None) -> list[Policy]:
    """The base model (iteration 0) and every finished ``iter<t>/model`` of a run folder, in order."""
    run_dir = Path(run_dir)
    policies = [Policy(0, base_model)]
    t = 1
    while iterations is None or t <= iterations:
        model = run_dir / f"iter{t}" / "model"
        if stage_summary(run_dir / f"iter{t}", "train") is None or not model.is_dir():
            if iterations is not None:
                raise PipelineError(f"{run_dir / f'iter{t}'} has no finished train stage (model/) to evaluate")
            break
        policies.append(Policy(t, str(model)))
        t += 1
    return policies


def evaluate_run(
    run_dir: str | Path,
    base_model: str,
    options: Any,
    *,
    scorer: PairwiseScorer | None = None,
) -> list[dict[str, Any]]:
    """The ``evaluate`` stage of ``run``: every iteration's policy and the base against the base (or
    ``--eval-baseline``), judged by ``scorer`` (default PairRM); skipped once finished. ``options``: the run's
    :class:`~sppo_kernels.pipeline.stages.PipelineOptions` (not imported here: the stage table imports this
    module for its options)."""
    evaluation = options.evaluate
    if evaluation.eval_prompts is None:
        raise PipelineError("the evaluate stage needs --eval-prompts")
    name = _judge_name(scorer) if scorer is not None else DEFAULT_JUDGE
    if stage_summary(Path(run_dir) / WORK_DIR, f"{STAGE}-{name}") is not None:
        print(f"[{STAGE}] finished earlier in {Path(run_dir) / WORK_DIR}; skipping")
        return read_json(Path(run_dir) / EVAL_JSON)
    return evaluate(
        run_policies(base_model, run_dir, options.run.iterations),
        evaluation.eval_prompts,
        run_dir,
        evaluation,
        options.generate,
        options.model,
        options.rank,
        options.prompts,
        judges=None if scorer is None else {name: scorer},
    )


# --------------------------------------------------------------------------------------------- command line

EVAL_GROUPS = {
    "prompts": PromptOptions,
    "model": ModelOptions,
    "generate": generate.GenerateOptions,
    "rank": RankOptions,
    "evaluate": EvalOptions,
}


def add_eval_command(commands: Any) -> None:
    """The ``sppo-train eval`` subcommand."""
    text = "win rates of a run's iterations against the base model, judged by PairRM (AlpacaEval-style)"
    sub = commands.add_parser("eval", help=text, description=text)
    source = sub.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="a `sppo-train run` folder: its base model and every iter<t>/model")
    source.add_argument("--models", nargs="+", help="models in iteration order, the first being the base (iteration 0)")
    sub.add_argument("--out", type=Path, help="output folder (default: the --run folder)")
    for group, cls in EVAL_GROUPS.items():
        add_options(sub, cls, title=f"{group} options")


def eval_command(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run ``sppo-train eval``: with ``--run``, options not given on the command line default to the run's."""
    recorded: dict[str, Any] = {}
    if args.run is not None:
        record = read_json(Path(args.run) / "run.json")
        recorded = record.get("options", {})
        policies = run_policies(str(record["model"]), args.run)
        out = args.out or args.run
    else:
        policies = [Policy(t, model) for t, model in enumerate(args.models)]
        if args.out is None:
            raise PipelineError("eval --models needs --out")
        out = args.out
    groups = {
        group: from_args(cls, args, **{k: v for k, v in recorded.get(group, {}).items() if k in _fields(cls)})
        for group, cls in EVAL_GROUPS.items()
    }
    evaluation: EvalOptions = groups["evaluate"]
    if evaluation.eval_prompts is None:
        raise PipelineError("eval needs --eval-prompts (held-out prompts)")
    return evaluate(
        policies,
        evaluation.eval_prompts,
        out,
        evaluation,
        groups["generate"],
        groups["model"],
        groups["rank"],
        groups["prompts"],
    )


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
