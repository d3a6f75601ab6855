"""Bad options and bad inputs give one line ``sppo-train: error: ...`` with exit
status 2 before any stage runs, and write nothing; local-looking paths never reach the network."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pipeline_data import PROMPTS_FILE

from sppo_kernels.pipeline import cli
from sppo_kernels.pipeline.core import schema, store
from sppo_kernels.pipeline.core.prompts import Prompt
from sppo_kernels.pipeline.models.sampling import GenerateOptions
from sppo_kernels.pipeline.stages.generate import run_generate


def _cli_error(capsys, *argv: str) -> str:
    """Run ``sppo-train ARGV`` in this process; it must exit with status 2 and one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sppo-train: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def run_args(policy: Path, tmp_path: Path, make_options: Callable, run_argv: Callable) -> Callable[..., list[str]]:
    """``run_args(*extra, prompts=..., model=...)``: a small ``sppo-train run`` into ``tmp_path/out``."""

    def make(*extra: str, prompts: Path | str | None = None, model: Path | str = policy) -> list[str]:
        argv = run_argv(model, tmp_path / "out", make_options(), *extra)
        if prompts is not None:
            argv[argv.index("--prompts") + 1] = str(prompts)
        return argv

    return make


# ---------------------------------------------------------------------------------------------- item 7: options


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eta", "-1"], "--eta must be a finite number > 0, got -1.0"),
        (["--eta", "nan"], "--eta must be a finite number > 0, got nan"),
        (["--learning-rate", "-1"], "--learning-rate must be a finite number > 0"),
        (["--temperature", "-0.5"], "--temperature must be a number >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be a number >= 1, got 0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--num-responses", "1"], "--num-responses must be a number >= 2"),
        (["--generation-seed", "-3"], "--generation-seed must be a number >= 0"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1]"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be a number >= 0"),
        (["--zero-stage", "4"], "--zero-stage must be 0, 1, 2 or 3"),
        (["--tie-tolerance", "inf"], "--tie-tolerance must be a number >= 0"),
        (["--iterations", "0"], "--iterations must be a number >= 1"),
        (["--max-prompts", "0"], "--max-prompts must be a number >= 1"),
        (["--max-prompt-length", "64"], "--max-prompt-length (64) must be < --max-length (64)"),
        (["--global-batch-size", "5"], "--global-batch-size 5 is not a multiple of --micro-batch-size 2"),
    ],
)
def test_bad_options_fail_before_anything_runs(
    run_args: Callable, tmp_path: Path, flags: list[str], message: str, capsys
) -> None:
    assert message in _cli_error(capsys, *run_args(*flags))
    assert not (tmp_path / "out").exists()


def test_bad_options_of_a_stage_command(policy: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "train_data.parquet"
    assert "--eta must be" in _cli_error(
        capsys, "train", "--model", policy, "--data", data, "--out", tmp_path / "o", "--eta", "-1"
    )
    args = ["generate", "--model", policy, "--prompts", PROMPTS_FILE, "--out", tmp_path / "o"]
    assert "--max-new-tokens must be" in _cli_error(capsys, *args, "--max-new-tokens", "0")
    assert not (tmp_path / "o").exists()


def test_temperature_zero_is_greedy(policy: Path, tmp_path: Path, prompts: list[Prompt]) -> None:
    """``--temperature 0`` used to end in a transformers traceback; it is greedy decoding (as in vLLM)."""
    options = GenerateOptions(num_responses=2, temperature=0.0, max_new_tokens=4, generation_shard_size=2)
    rows = store.read_jsonl(run_generate(str(policy), prompts[:3], tmp_path, options))
    assert all(len(set(row["responses"])) == 1 for row in rows)  # every pass gives the same greedy response


# ---------------------------------------------------------------------------------------------- item 8: inputs


def _write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("p.jsonl", b'{"prompt": "caf\xe9"}\n', r"p.jsonl:1 is not UTF-8 text \(byte 0xe9\)"),
        ("p.txt", b"fine\n\xff\xfe broken\n", r"p.txt is not UTF-8 text"),
        ("p.json", b'["ok", "\xc3"]', r"p.json is not UTF-8 text"),
        ("p.jsonl", '{"messages": [{"content": "hi"}]}\n', r"row 0 message 1: the chat message lacks 'role'"),
        ("p.jsonl", '{"messages": [{"role": "user"}]}\n', r"row 0 message 1: the chat message lacks 'content'"),
        ("p.jsonl", '{"messages": [{"role": "user", "content": 3}]}\n', r"row 0 message 1 content: expected a string"),
        (
            "p.jsonl",
            '{"prompt": "ok"}\n{"prompt": "bad \\ud800 text"}\n',
            r"row 1: not valid Unicode text \(lone surrogate",
        ),
    ],
)
def test_bad_prompt_files(
    run_args: Callable, tmp_path: Path, name: str, content: str | bytes, message: str, capsys
) -> None:
    import re

    prompts = _write(tmp_path / name, content)
    assert re.search(message, _cli_error(capsys, *run_args(prompts=prompts)))
    assert not (tmp_path / "out").exists()  # no run.json, no empty iter1


def test_over_long_prompts_are_refused_before_generation(
    run_args: Callable, policy: Path, tmp_path: Path, capsys
) -> None:
    huge = _write(tmp_path / "huge.jsonl", json.dumps({"prompt": "word " * 2_000_000}) + "\n")  # 10 MB
    started = time.perf_counter()
    assert "prompt 0 has 10000000 characters" in _cli_error(capsys, *run_args(prompts=huge))
    assert time.perf_counter() - started < 20 and not (tmp_path / "out").exists()
    long = _write(
        tmp_path / "long.jsonl", json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "w " * 600}) + "\n"
    )
    error = _cli_error(capsys, "generate", "--model", policy, "--prompts", long, "--out", tmp_path / "g")
    assert "prompt 1 has" in error and "tokens; the model's context is 512 (max_position_embeddings)" in error
    assert not (tmp_path / "g").exists()


def test_bad_out_folders(run_args: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    argv = run_args()
    out = argv.index("--out") + 1
    _write(tmp_path / "file", "x")
    argv[out] = str(tmp_path / "file")
    assert "--out " + str(tmp_path / "file") + " is a file, not a folder" in _cli_error(capsys, *argv)
    argv[out] = str(tmp_path / "file" / "run")
    assert f"cannot be created: {tmp_path / 'file'} is a file" in _cli_error(capsys, *argv)
    argv[out] = str(tmp_path / "ro" / "run")
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "ro" and real_access(p, mode))
    assert f"is not writable ({tmp_path / 'ro'})" in _cli_error(capsys, *argv)  # (tests run as root: chmod is moot)
    assert list((tmp_path / "ro").iterdir()) == []


def test_bad_model_folders(run_args: Callable, policy: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"the model folder {empty} is empty" in _cli_error(capsys, *run_args(model=empty))
    tokenizer_only = tmp_path / "tokenizer-only"
    tokenizer_only.mkdir()
    shutil.copy(policy / "tokenizer.json", tokenizer_only)
    assert "is not a model folder: it has no config.json" in _cli_error(capsys, *run_args(model=tokenizer_only))
    truncated = shutil.copytree(policy, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert f"{weights} is truncated" in _cli_error(capsys, *run_args(model=truncated))
    weights.write_bytes(b"\x10\x00")
    assert "is not a valid safetensors file" in _cli_error(capsys, *run_args(model=truncated))
    assert not (tmp_path / "out").exists()


def test_truncated_unit_file(policy: Path, tmp_path: Path, capsys) -> None:
    args = ["generate", "--model", policy, "--prompts", PROMPTS_FILE, "--out", tmp_path, "--max-prompts", "4"]
    args += ["--num-responses", "2", "--max-new-tokens", "3", "--generation-shard-size", "2"]
    assert cli.main([str(a) for a in args]) == 0
    schema.marker_path(tmp_path, "generate").unlink()  # as if killed after the units were written
    unit = tmp_path / "generate_units" / "unit-00001.jsonl"
    text = unit.read_text()
    unit.write_text(text[: text.index("\n") + 1])  # the first row only: valid JSON lines, but cut
    error = _cli_error(capsys, *args)
    assert f"{unit} has no complete end line: the unit file is truncated or corrupt" in error
    unit.write_text(text[:-10])  # cut inside its last line
    assert f"{unit}:3 is not valid JSON" in _cli_error(capsys, *args)
    assert cli.main([str(a) for a in [*args, "--discard-stale"]]) == 0  # the corrupt unit is recomputed
    assert unit.read_text() == text


# ---------------------------------------------------------------------------------------------- item 9: network


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every network connection and every ``datasets.load_dataset`` call is recorded and fails."""
    import datasets

    calls: list[str] = []

    def load_dataset(name: str, *args: object, **kwargs: object) -> None:
        calls.append(f"load_dataset({name!r})")
        raise ConnectionError("no network in this test")

    def connect(self: socket.socket, address: object) -> None:
        calls.append(f"connect({address!r})")
        raise ConnectionError("no network in this test")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return calls


@pytest.mark.parametrize(
    "source",
    ["prompts.jsnl", "prompts.csv", "data/prompts", "./prompts", "sub/dir/prompts", "data/prompts.jsonl", "prompts"],
)
def test_local_looking_prompt_paths_never_reach_the_network(
    run_args: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str], source: str, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    error = _cli_error(capsys, *run_args(prompts=source))
    assert f"missing file: {source} (a local path, so not looked up on the hub" in error
    assert no_network == [] and not (tmp_path / "out").exists()


def test_existing_file_of_unknown_type(run_args: Callable, tmp_path: Path, no_network: list[str], capsys) -> None:
    csv = _write(tmp_path / "prompts.csv", "prompt\nhello\n")
    assert "unsupported prompt file type '.csv' (use .jsonl, .json, .txt)" in _cli_error(capsys, *run_args(prompts=csv))
    assert no_network == []


def test_hub_names_only_when_owner_slash_name(
    run_args: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str], capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    error = _cli_error(capsys, *run_args(prompts="someone/prompt-set"))
    assert "cannot load prompts from the hub dataset (no such local path) 'someone/prompt-set'" in error
    assert no_network == ["load_dataset('someone/prompt-set')"]


@pytest.mark.parametrize("flag", ["--model", "--ranker"])
def test_local_looking_model_paths_never_reach_the_network(
    run_args: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str], flag: str, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = run_args()
    argv[argv.index(flag) + 1] = "./models/missing"
    error = _cli_error(capsys, *argv)
    assert "'./models/missing': local path not found (hub names look like owner/name" in error
    assert no_network == [] and not (tmp_path / "out").exists()
