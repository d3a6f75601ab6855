"""``evaluate``: win rates of every iteration's policy against a baseline, judged pairwise, AlpacaEval 2.0-style.

For each policy (iteration 0 = the base model, then each ``iter<t>/model``) one response per held-out prompt is
generated with the generation stage's engine (vLLM on CUDA, else HF), with the paper's sampling (the generate
options' temperature/top_p, default 0.7/0.9) or greedily, and with the same seed for every policy
(:mod:`.responses`). A pairwise judge (PairRM through llm-blender by default; any
:class:`~sppo_kernels.pipeline.models.judge.PairwiseScorer`) compares it with the baseline's response to the same
prompt in both orders (:mod:`.verdicts`), and the verdicts give, per iteration (:mod:`.statistics`):

- the win rate (ties count ½) and its 95% interval (percentile bootstrap over prompts, seeded);
- the length-controlled win rate (a logistic GLM of the verdicts on the normalised length difference, predicted
  at zero length difference; docs/evaluation.md holds the exact formula);
- the policy's average response length in characters and in tokens.

Each judge's evaluation is one :class:`~sppo_kernels.pipeline.core.stage.Stage` (marker
``eval/stages/evaluate-<judge>.json``, holding its rows); ``eval.json``, ``eval.md`` and ``eval.png`` are written
from the rows of every judge whose evaluation is finished in ``eval/`` (:mod:`.report`). The files are named in
:mod:`~sppo_kernels.pipeline.core.schema`. Evaluation never trains or changes a model, and the judge sees only
the prompt and the two responses.

Nothing is reported that another evaluation made: ``eval/settings.json`` holds the fingerprint of the policies,
prompts and generation settings, each judge's marker that of its rows (the same, plus the statistics' settings);
per-prompt rows (outputs, verdicts, units) are matched to the prompts by id (:mod:`.prompt_sets`). A mismatch is
refused naming what differs, or with ``--discard-stale`` redone (or, for a judge not run this time, dropped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from sppo_kernels.pipeline.core import distributed, schema
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import (
    Fingerprint,
    file_identity,
    model_identity,
    prompts_identity,
    stage_fingerprint,
)
from sppo_kernels.pipeline.core.options import at_least, opt, validated
from sppo_kernels.pipeline.core.prompts import Prompt, PromptOptions
from sppo_kernels.pipeline.core.stage import Stage, run_stage
from sppo_kernels.pipeline.core.store import (
    StaleWorkError,
    read_json,
    remove_tree,
    settle_stale,
    stage_summary,
    write_json,
)
from sppo_kernels.pipeline.evaluation.prompt_sets import EvalPrompts, eval_prompts, read_by_id, run_training_prompts
from sppo_kernels.pipeline.evaluation.report import finished_rows, write_reports
from sppo_kernels.pipeline.evaluation.responses import Responses, sampling_settings
from sppo_kernels.pipeline.evaluation.statistics import ALPACA_FOLDS, LC_FITS, require_sklearn, summarize
from sppo_kernels.pipeline.evaluation.verdicts import Verdicts
from sppo_kernels.pipeline.models import chat
from sppo_kernels.pipeline.models.judge import PairwiseScorer, RankOptions, judge_identity, pairrm
from sppo_kernels.pipeline.models.policy import ModelOptions
from sppo_kernels.pipeline.models.sampling import GenerateOptions, Sampler

DEFAULT_JUDGE = "pairrm"


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
    lc_fit: str = opt(
        "ridge",
        "fit of the length-controlled win rate: ridge (penalised Newton, no dependency) or alpaca (AlpacaEval "
        "2.0's length_controlled_minimal, cross-validated L1 through scikit-learn: the eval extra)",
        LC_FITS,
        fingerprinted=False,
    )
    eval_baseline: str | None = opt(None, "baseline model (default: the base policy, iteration 0)", fingerprinted=False)
    eval_shard_size: int = opt(64, "prompts per saved unit of work", check=at_least(1), fingerprinted=False)
    eval_dataset: str | None = opt(
        None, "'dataset' field of model_outputs.json (default: the eval prompts' name)", fingerprinted=False
    )


@dataclass(frozen=True)
class Policy:
    """One evaluated model: its iteration (0 = the base) and folder or hub name."""

    iteration: int
    path: str


def run_policies(base_model: str, run_dir: str | Path, iterations: int | None = None) -> list[Policy]:
    """The base model (iteration 0) and every finished ``iter<t>/model`` of a run folder, in order."""
    run_dir = Path(run_dir)
    policies = [Policy(0, base_model)]
    t = 1
    while iterations is None or t <= iterations:
        folder = schema.iteration_dir(run_dir, t)
        if stage_summary(folder, schema.TRAIN_STAGE) is None or not (folder / schema.MODEL_DIR).is_dir():
            if iterations is not None:
                raise PipelineError(f"{folder} has no finished train stage ({schema.MODEL_DIR}/) to evaluate")
            break
        policies.append(Policy(t, str(folder / schema.MODEL_DIR)))
        t += 1
    return policies


def sampling_options(options: EvalOptions, generate_options: GenerateOptions) -> GenerateOptions:
    """The generation settings of the evaluation: one response, the paper's sampling or greedy decoding."""
    greedy = options.eval_sampling == "greedy"
    return dataclasses.replace(
        generate_options,
        num_responses=1,
        temperature=0.0 if greedy else generate_options.temperature,
        top_p=1.0 if greedy else generate_options.top_p,
    )


@dataclass
class Evaluation:
    """What every judge of one evaluation shares: the policies, the baseline, the prompts and the settings, and
    the responses of every model (generated once, whichever judges look at them)."""

    out: Path
    policies: Sequence[Policy]
    baseline: str
    prompt_set: EvalPrompts
    prompts_source: str
    options: EvalOptions
    sampling: GenerateOptions
    model_options: ModelOptions
    rank_options: RankOptions
    samplers: dict[str, Sampler]

    @property
    def work_dir(self) -> Path:
        return self.out / schema.EVAL_DIR

    @property
    def prompts(self) -> list[Prompt]:
        return self.prompt_set.prompts

    @property
    def ids(self) -> list[int]:
        return [p.id for p in self.prompts]

    @property
    def dataset(self) -> str:
        return self.options.eval_dataset or Path(self.prompts_source).stem

    @cached_property
    def folders(self) -> dict[str, Path]:
        """Model path → the folder of its outputs (a model listed twice is generated once)."""
        folders: dict[str, Path] = {}
        for p in self.policies:
            folders.setdefault(p.path, schema.eval_policy_dir(self.work_dir, p.iteration))
        folders.setdefault(self.baseline, schema.eval_policy_dir(self.work_dir, None))
        return folders

    @cached_property
    def identities(self) -> dict[str, Any]:
        """The fingerprint inputs every judge's evaluation shares: the models, the prompts and the settings."""
        identities: dict[str, Any] = {f"iteration {p.iteration}": model_identity(p.path) for p in self.policies}
        identities |= {"baseline": model_identity(self.baseline), "prompts": prompts_identity(self.prompts)}
        seed, shard_size = self.options.eval_seed, self.options.eval_shard_size
        settings = sampling_settings(self.sampling, seed=seed, shard_size=shard_size, dataset=self.dataset)
        return identities | {"settings": settings}

    @cached_property
    def results_fingerprint(self) -> Fingerprint:
        """What every judge's ``eval.json`` rows depend on besides the judge: the shared inputs and the
        statistics' settings. Stored in each judge's marker; rows of another are never reported together."""
        statistics = {"bootstrap": self.options.eval_bootstrap, "lc_fit": self.options.lc_fit}
        return stage_fingerprint(
            schema.EVALUATE_STAGE, {**self.identities, "statistics": statistics}, self.model_options
        )  # fmt: skip

    def settle_settings(self) -> None:
        """Record the evaluation's fingerprint (and its readable settings) in ``eval/settings.json``, or settle an
        earlier evaluation there made from other policies, prompts or settings (or whose settings.json is gone):
        refused, or (``--discard-stale``) removed with every judge's results and redone."""
        fingerprint = stage_fingerprint(schema.EVALUATE_STAGE, self.identities, self.model_options)
        path = self.work_dir / schema.EVAL_SETTINGS
        stored = read_json(path) if path.is_file() else None
        what = f"the evaluation in {self.work_dir}"
        earlier = stored is not None or (self.work_dir / schema.MARKER_DIR).is_dir()
        if earlier and not settle_stale(what, (stored or {}).get("fingerprint"), fingerprint, self.discard):
            stored = None
        overlap = self.prompt_set.overlap
        if overlap is None and stored is not None:  # the run's training prompts are not known this time
            overlap = stored.get("training_overlap")
        readable = {
            "policies": [asdict(p) for p in self.policies],
            "baseline": self.baseline,
            "prompts": self.prompts_source,
            "repeated_prompts": self.prompt_set.repeated,
            "training_overlap": overlap,
            "options": asdict(self.options),
            "generate": asdict(self.sampling),
        }
        write_json(path, {**readable, "fingerprint": fingerprint.record})

    def discard(self) -> None:
        """Remove the earlier evaluation: its folder and the reports written from it."""
        remove_tree(self.work_dir)
        for name in (schema.EVAL_JSON.name, schema.EVAL_TABLE, schema.EVAL_PLOT):
            remove_tree(self.out / name)

    def settle_judges(self, running: Sequence[str]) -> None:
        """Settle the finished judges that this call does not run: their rows must come from the same
        evaluation and statistics (else refused, or dropped with ``--discard-stale``)."""
        running_markers = {f"{schema.EVALUATE_STAGE}-{name}.json" for name in running}
        for marker in sorted((self.work_dir / schema.MARKER_DIR).glob(f"{schema.EVALUATE_STAGE}-*.json")):
            if marker.name in running_markers:
                continue
            changes = self.results_fingerprint.differences(read_json(marker).get("evaluation"))
            if not changes:
                continue
            why = f"{marker} holds another evaluation's results ({'; '.join(changes)})"
            if not self.results_fingerprint.discard_stale:
                raise StaleWorkError(f"{why}; evaluate with that judge again, or pass --discard-stale to drop them")
            print(f"discarding: {why}", flush=True)
            remove_tree(marker)

    @cached_property
    def outputs(self) -> dict[str, list[dict[str, Any]]]:
        """Model path → its rows of ``outputs.jsonl`` in prompt order (generated, or read back when finished)."""
        outputs = {}
        for model, folder in self.folders.items():
            stage = Responses(
                model, self.prompts, folder, self.sampling, self.model_options, seed=self.options.eval_seed,
                shard_size=self.options.eval_shard_size, generator=f"{self.out.resolve().name}-{folder.name}",
                dataset=self.dataset, sampler=self.samplers.get(model),
            )  # fmt: skip
            outputs[model] = read_by_id(stage, schema.EVAL_OUTPUTS.columns, self.ids)
        return outputs


class Evaluate(Stage):
    """One judge's evaluation of every policy against the baseline; its marker holds its ``eval.json`` rows and
    the fingerprint they share with the other judges' (:attr:`Evaluation.results_fingerprint`)."""

    def __init__(self, evaluation: Evaluation, judge_name: str, judge: PairwiseScorer | None) -> None:
        super().__init__(evaluation.work_dir, evaluation.options)
        self.name = f"{schema.EVALUATE_STAGE}-{judge_name}"
        self.evaluation, self.judge_name, self.given_judge = evaluation, judge_name, judge

    @property
    def output(self) -> Path:
        """``eval.json``, written from every finished judge's rows once the judges have run."""
        return schema.EVAL_JSON.path(self.evaluation.out)

    def judge_inputs(self) -> tuple[dict[str, str], RankOptions | None]:
        """The judge's identity and options: PairRM's checkpoint and settings, or a plugged-in scorer's class."""
        if self.given_judge is None:
            return judge_identity(None), self.evaluation.rank_options
        return judge_identity(self.given_judge), None

    def fingerprint(self) -> Fingerprint:
        identity, options = self.judge_inputs()
        shared = self.evaluation.results_fingerprint.record
        groups = [self.evaluation.model_options] + ([options] if options is not None else [])
        return stage_fingerprint(schema.EVALUATE_STAGE, {**shared["inputs"], "judge": identity}, *groups)

    @cached_property
    def judge(self) -> PairwiseScorer:
        """Built at the first comparison: a fully resumed evaluation loads no judge."""
        return self.given_judge if self.given_judge is not None else pairrm(self.evaluation.rank_options)

    def verdicts(self, policy: Policy) -> Verdicts:
        """The judging of ``policy``'s responses against the baseline's, paired by prompt id."""
        e = self.evaluation
        identity, options = self.judge_inputs()
        pairs = list(zip(e.outputs[policy.path], e.outputs[e.baseline], strict=True))  # generated first if need be
        compared = {
            "policy outputs": file_identity(schema.EVAL_OUTPUTS.path(e.folders[policy.path])),
            "baseline outputs": file_identity(schema.EVAL_OUTPUTS.path(e.folders[e.baseline])),
            "judge": identity,
            "settings": {"shard_size": e.options.eval_shard_size},
        }
        return Verdicts(
            lambda: self.judge, self.judge_name, pairs, e.folders[policy.path],
            stage_fingerprint("eval-judge", compared, *([options] if options else [])),
            shard_size=e.options.eval_shard_size, where=f"{e.prompts_source} (policy {policy.path})",
        )  # fmt: skip

    def compute(self, fingerprint: Fingerprint) -> list[dict[str, Any]]:
        e = self.evaluation
        rows = []
        for p in e.policies:
            judged = read_by_id(self.verdicts(p), schema.JUDGMENTS.required, e.ids)
            outcomes = [v["outcome"] for v in judged]
            stats = summarize(outcomes, e.outputs[p.path], e.outputs[e.baseline], resamples=e.options.eval_bootstrap,
                              seed=e.options.eval_seed, lc_fit=e.options.lc_fit)  # fmt: skip
            counts = {"wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0)}
            rows.append({"iteration": p.iteration, "judge": self.judge_name, **stats, **counts})
        return rows

    def finish(self, computed: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
        final = max(computed, key=lambda r: r["iteration"])
        report = (
            f"iteration {final['iteration']} wins {100 * final['win_rate']:.2f}% "
            f"(LC {100 * final['lc_win_rate']:.2f}%) against the baseline, {len(self.evaluation.prompts)} prompts"
        )
        return {"rows": computed, "evaluation": self.evaluation.results_fingerprint.record}, report


def check_tokenizer(model: str, model_options: ModelOptions) -> None:
    """A clear error when ``model`` has no usable tokenizer (transformers raises OSError or ValueError)."""
    try:
        chat.load_tokenizer(model, trust_remote_code=model_options.trust_remote_code)
    except ValueError as e:
        raise PipelineError(f"cannot load a tokenizer from {model!r}: {str(e).splitlines()[0]}") from e


def judge_name(judge: Any) -> str:
    """A plugged-in judge's name: its ``name`` attribute, else its class name."""
    return str(getattr(judge, "name", None) or type(judge).__name__)


def plan_evaluation(
    policies: Sequence[Policy],
    prompts_source: str,
    out: str | Path,
    options: EvalOptions,
    generate_options: GenerateOptions,
    model_options: ModelOptions,
    rank_options: RankOptions,
    prompt_options: PromptOptions,
    samplers: dict[str, Sampler],
    training_prompts: Sequence[Prompt] | None,
) -> Evaluation:
    """Check everything an evaluation needs before any work: the options (and scikit-learn for ``--lc-fit
    alpaca``), the prompts (unique ids; repeats dropped and overlap with ``training_prompts`` noted, for a
    warning each), the baseline and every model's tokenizer."""
    prompt_options = dataclasses.replace(prompt_options, max_prompts=options.eval_max_prompts)
    for group in (options, generate_options, model_options, rank_options, prompt_options):
        validated(group)
    if not policies:
        raise PipelineError("evaluate: no policies to evaluate")
    prompt_set = eval_prompts(prompts_source, prompt_options, training_prompts)
    if options.lc_fit == "alpaca":
        require_sklearn()
        if len(prompt_set.prompts) < ALPACA_FOLDS:
            raise PipelineError(f"--lc-fit alpaca needs at least {ALPACA_FOLDS} eval prompts (its cross-validation "
                                f"folds), got {len(prompt_set.prompts)}")  # fmt: skip
    baseline = options.eval_baseline or next((p.path for p in policies if p.iteration == 0), None)
    if baseline is None:
        raise PipelineError("evaluate: no baseline (give --eval-baseline, or an iteration-0 policy)")
    for model in dict.fromkeys([baseline, *(p.path for p in policies)]):
        check_tokenizer(model, model_options)
    sampling = sampling_options(options, generate_options)
    return Evaluation(Path(out), policies, baseline, prompt_set, prompts_source, options, sampling, model_options,
                      rank_options, samplers)  # fmt: skip


def evaluate(
    policies: Sequence[Policy],
    prompts_source: str,
    out: str | Path,
    options: EvalOptions,
    generate_options: GenerateOptions | None = None,
    model_options: ModelOptions | None = None,
    rank_options: RankOptions | None = None,
    prompt_options: PromptOptions | None = None,
    *,
    judges: dict[str, PairwiseScorer | None] | None = None,
    samplers: dict[str, Sampler] | None = None,
    training_prompts: Sequence[Prompt] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``policies`` on the prompts of ``prompts_source`` against the baseline with each judge.

    ``judges`` maps a name to a scorer, or to None for PairRM from ``rank_options`` (default: PairRM alone);
    ``samplers`` optionally maps a model path to a generation engine (tests); ``training_prompts``: the run's,
    to report eval prompts the policies were trained on (None: not known). Returns the rows written to
    ``out/eval.json``: those of every judge whose evaluation is finished there.
    """
    judges = judges or {DEFAULT_JUDGE: None}
    evaluation = plan_evaluation(
        policies, prompts_source, out, options, generate_options or GenerateOptions(), model_options or ModelOptions(),
        rank_options or RankOptions(), prompt_options or PromptOptions(), samplers or {}, training_prompts,
    )  # fmt: skip
    distributed.join()
    if distributed.rank() == 0:
        for line in evaluation.prompt_set.warnings(prompts_source):
            print(f"[{schema.EVALUATE_STAGE}] warning: {line}", flush=True)
    distributed.on_rank_zero(evaluation.settle_settings)
    distributed.on_rank_zero(lambda: evaluation.settle_judges(list(judges)))
    for name, judge in judges.items():
        run_stage(Evaluate(evaluation, name, judge))
    rows = finished_rows(evaluation.work_dir)
    if distributed.rank() == 0:
        write_reports(evaluation.out, rows)
    distributed.barrier()
    return rows


def evaluate_run(run_dir: str | Path, base_model: str, options: Any, *, scorer: PairwiseScorer | None = None) -> list:
    """The ``evaluate`` stage of ``run``: every iteration's policy and the base against the base (or
    ``--eval-baseline``), judged by ``scorer`` (default PairRM). ``options``: the run's
    :class:`~sppo_kernels.pipeline.table.PipelineOptions` (not imported: the stage table imports this module)."""
    if options.evaluate.eval_prompts is None:
        raise PipelineError("the evaluate stage needs --eval-prompts")
    policies = run_policies(base_model, run_dir, options.run.iterations)
    return evaluate(
        policies,
        options.evaluate.eval_prompts,
        run_dir,
        options.evaluate,
        options.generate,
        options.model,
        options.rank,
        options.prompts,
        judges={DEFAULT_JUDGE: None} if scorer is None else {judge_name(scorer): scorer},
        training_prompts=run_training_prompts(run_dir, [p.iteration for p in policies if p.iteration > 0]),
    )
