"""Unit tests of the plumbing: atomic files, resumable units, options <-> flags, prompt loading, tokenisation."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from sppo_kernels.pipeline.core import store
from sppo_kernels.pipeline.core.errors import PipelineError
from sppo_kernels.pipeline.core.fingerprint import stage_fingerprint
from sppo_kernels.pipeline.core.options import add_options, from_args, to_argv, to_record, validated
from sppo_kernels.pipeline.core.prompts import Prompt, PromptOptions, load_prompts, split_prompts
from sppo_kernels.pipeline.models import chat
from sppo_kernels.pipeline.models.policy import ModelOptions
from sppo_kernels.pipeline.models.sampling import GenerateOptions
from sppo_kernels.pipeline.stages.targets import TargetsOptions
from sppo_kernels.pipeline.stages.train import TrainOptions
from sppo_kernels.pipeline.table import PipelineOptions

# ---------------------------------------------------------------------------------------------- store


def test_atomic_write_failure_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    store.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), store.atomic_path(path) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert store.read_json(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_folder_replaces_whole_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"
    for content in ("old", "new"):
        with store.atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / content).write_text(content)
    assert [p.name for p in target.iterdir()] == ["new"]


def test_run_units_resumes_and_ignores_temp_files(tmp_path: Path) -> None:
    calls: list[int] = []

    def work(index: int, unit: str) -> list[dict]:
        calls.append(index)
        return [{"unit": unit}]

    folder = tmp_path / "units"
    fingerprint = stage_fingerprint("t", {})
    assert store.run_units(folder, ["a", "b", "c"], work, fingerprint=fingerprint, desc="t") == [
        [{"unit": u}] for u in "abc"
    ]
    (folder / "unit-00001.jsonl").unlink()
    (folder / ".unit-00001.jsonl.123.tmp").write_text('{"unit": "stale partial')  # left by a killed process
    calls.clear()
    assert store.run_units(folder, ["a", "b", "c"], work, fingerprint=fingerprint, desc="t")[1] == [{"unit": "b"}]
    assert calls == [1]


def test_read_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="missing file"):
        store.read_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(PipelineError, match=r"bad.jsonl:2 is not valid JSON"):
        store.read_jsonl(bad)
    with pytest.raises(PipelineError, match="chunk size"):
        store.chunks([1], 0)


def test_stage_markers(tmp_path: Path) -> None:
    assert store.stage_summary(tmp_path, "rank") is None
    store.mark_done(tmp_path, "rank", {"prompts": 3})
    assert store.stage_summary(tmp_path, "rank") == {"prompts": 3}


# ---------------------------------------------------------------------------------------------- options


def test_options_round_trip_through_flags() -> None:
    parser = argparse.ArgumentParser()
    for cls in (GenerateOptions, TargetsOptions, TrainOptions):
        add_options(parser, cls)
    options = (
        GenerateOptions(num_responses=4, top_p=0.5),
        TargetsOptions(target_mode="all", drop_all_ties=False),
        TrainOptions(deepspeed_config="ds.json", learning_rate=1e-6, gradient_checkpointing=False),
    )
    argv = [flag for o in options for flag in to_argv(o)]
    assert "--no-drop-all-ties" in argv and "--no-gradient-checkpointing" in argv
    args = parser.parse_args(argv)
    assert tuple(from_args(type(o), args) for o in options) == options
    assert from_args(GenerateOptions, parser.parse_args([])) == GenerateOptions()


def test_every_option_has_one_name() -> None:
    """An option's field name is its key in ``run.json`` and, with dashes, its flag; there is no other spelling."""
    for group in dataclasses.fields(PipelineOptions):
        options = group.default_factory()
        actions = parser_for(type(options))._actions
        flags = {action.dest: action.option_strings for action in actions if action.dest != "help"}
        fields = {field.name for field in dataclasses.fields(options)}
        assert set(to_record(options)) == fields == set(flags), group.name
        for name, strings in flags.items():
            assert strings[0] == "--" + name.replace("_", "-"), strings
    options = from_args(ModelOptions, parser_for(ModelOptions).parse_args(["--kernel-backend", "chunked"]))
    assert options == ModelOptions(kernel_backend="chunked") and to_argv(options) == ["--kernel-backend", "chunked"]
    with pytest.raises(TypeError):
        ModelOptions(backend="chunked")  # type: ignore[call-arg]
    with pytest.raises(PipelineError, match="--kernel-backend must be one of"):
        validated(ModelOptions(kernel_backend="fast"))


def parser_for(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_options(parser, cls)
    return parser


def test_bad_choices_are_rejected() -> None:
    with pytest.raises(PipelineError, match="--target-mode must be one of"):
        validated(TargetsOptions(target_mode="some"))
    parser = argparse.ArgumentParser()
    add_options(parser, TargetsOptions)
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss-type", "dpo"])


# ---------------------------------------------------------------------------------------------- prompts


def test_load_prompts_formats(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert [p.text for p in load_prompts(str(tmp_path / "p.txt"))] == ["first", "second"]
    chat_rows = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "reference answer"}]},
    ]
    (tmp_path / "c.json").write_text(json.dumps(chat_rows))
    loaded = load_prompts(str(tmp_path / "c.json"))
    assert [len(p.messages) for p in loaded] == [2, 1] and loaded[0].text == "hi"
    (tmp_path / "q.jsonl").write_text('{"question": "a"}\n{"question": "b"}\n{"question": "c"}\n')
    assert [p.id for p in load_prompts(str(tmp_path / "q.jsonl"), PromptOptions("question", max_prompts=2))] == [0, 1]
    # explicit integer ids are kept (per-iteration prompt files)
    (tmp_path / "ids.jsonl").write_text(
        "".join(json.dumps(Prompt(i, ({"role": "user", "content": "x"},)).to_json()) + "\n" for i in (7, 9))
    )
    assert [p.id for p in load_prompts(str(tmp_path / "ids.jsonl"))] == [7, 9]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ('{"prompt": ""}\n', "empty prompt"),
        ('{"text": "x"}\n', "expected a string"),
        ("[1", "not valid JSON"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / ("p.json" if content.startswith("[") else "p.jsonl")
    path.write_text(content)
    with pytest.raises(PipelineError, match=message):
        load_prompts(str(path))


def test_missing_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="missing file"):
        load_prompts(str(tmp_path / "none.jsonl"))


def test_split_prompts_disjoint_and_complete(prompts: list[Prompt]) -> None:
    splits = split_prompts(prompts, 3)
    assert [len(s) for s in splits] == [16, 16, 16]
    assert [p.id for s in splits for p in s] == [p.id for p in prompts]
    assert [len(s) for s in split_prompts(prompts[:7], 3)] == [2, 3, 2]
    with pytest.raises(PipelineError, match="cannot be split"):
        split_prompts(prompts[:2], 3)


# ---------------------------------------------------------------------------------------------- tokenisation


def test_prompt_and_sequence_tokens_have_single_bos_eos(policy: Path) -> None:
    tokenizer = chat.load_tokenizer(str(policy))
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    prompt_ids = chat.encode_prompt(tokenizer, messages)
    assert prompt_ids.count(tokenizer.bos_token_id) == 1 and prompt_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(prompt_ids).endswith("<|assistant|>\n")  # the header belongs to the prompt
    seq = chat.encode_sequence(
        tokenizer, messages, "Rayleigh scattering.", complete=True, max_length=512, max_prompt_length=256
    )
    assert seq.input_ids[: seq.prompt_length] == prompt_ids
    response = seq.input_ids[seq.prompt_length :]
    assert tokenizer.decode(response) == "Rayleigh scattering.<|end|>"
    assert seq.input_ids.count(tokenizer.bos_token_id) == 1 and response.count(tokenizer.eos_token_id) == 1
    assert not seq.truncated
    cut = chat.encode_sequence(tokenizer, messages, "Rayleigh", complete=False, max_length=512, max_prompt_length=256)
    assert tokenizer.eos_token_id not in cut.input_ids[cut.prompt_length :] and cut.truncated  # it never ended


def test_truncation_keeps_prompt_tail_and_marks_response(policy: Path) -> None:
    tokenizer = chat.load_tokenizer(str(policy))
    messages = [{"role": "user", "content": "word " * 200}]
    full_prompt = chat.encode_prompt(tokenizer, messages)
    seq = chat.encode_sequence(tokenizer, messages, "a b c " * 50, complete=True, max_length=64, max_prompt_length=40)
    assert seq.prompt_length == 40 and seq.input_ids[:40] == full_prompt[-40:]
    assert len(seq.input_ids) == 64 and seq.truncated
    with pytest.raises(PipelineError, match="max_prompt_length"):
        chat.encode_sequence(tokenizer, messages, "x", complete=True, max_length=8, max_prompt_length=8)


def test_tokenizer_without_chat_template(tmp_path: Path, policy: Path) -> None:
    tokenizer = chat.load_tokenizer(str(policy))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(PipelineError, match="no chat template"):
        chat.load_tokenizer(str(tmp_path))
    with pytest.raises(PipelineError, match="cannot load a tokenizer"):
        chat.load_tokenizer(str(tmp_path / "missing"))
