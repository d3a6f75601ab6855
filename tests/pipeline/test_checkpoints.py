"""Removing checkpoints is crash-safe (rename, then delete; after the stage's marker) and a
rerun resumes, or starts over, from whatever a killed save or removal left, in any order of deletion."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from sppo_kernels.pipeline.core import schema, store
from sppo_kernels.pipeline.core.fingerprint import discarding_stale, stage_fingerprint
from sppo_kernels.pipeline.stages import train
from sppo_kernels.pipeline.stages.train import checkpoint_to_resume

FINGERPRINT = stage_fingerprint("train", {}).with_layout(processes=1)
FILES = {"mp_rank_00_model_states.pt": 10, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 20}


def _checkpoint(folder: Path, step: int) -> Path:
    """A complete checkpoint as :func:`train.save_checkpoint` leaves it (files of the given sizes)."""
    tag = folder / f"step-{step:07d}"
    tag.mkdir(parents=True)
    for name, size in FILES.items():
        (tag / name).write_bytes(b"x" * size)
    state = {"tag": tag.name, "step": step, "files": FILES, "fingerprint": FINGERPRINT.record}
    store.write_json(folder / schema.LATEST_CHECKPOINT, state)
    return tag


# What a kill leaves while checkpoints are saved or removed (shutil.rmtree deletes in directory order, so any
# file may go first): each partial state, and whether the checkpoint is still usable.
PARTIAL = {
    "complete": (lambda f, t: None, True),
    "an older step folder left half-removed": (lambda f, t: _half(_checkpoint_copy(f, t, 1)), True),
    "step folder gone, latest.json left": (lambda f, t: shutil.rmtree(t), False),
    "model states gone": (lambda f, t: (t / "mp_rank_00_model_states.pt").unlink(), False),
    "optimizer states gone": (lambda f, t: (t / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(), False),
    "a file cut short": (lambda f, t: (t / "mp_rank_00_model_states.pt").write_bytes(b"x"), False),
    "latest.json gone, step folder left": (lambda f, t: (f / schema.LATEST_CHECKPOINT).unlink(), False),
    "latest.json gone, step folder half-removed": (
        lambda f, t: ((f / schema.LATEST_CHECKPOINT).unlink(), _half(t)),
        False,
    ),
    "only an empty folder": (lambda f, t: (shutil.rmtree(t), (f / schema.LATEST_CHECKPOINT).unlink()), False),
}


def _checkpoint_copy(folder: Path, tag: Path, step: int) -> Path:
    return shutil.copytree(tag, folder / f"step-{step:07d}")


def _half(tag: Path) -> None:
    next(tag.iterdir()).unlink()


@pytest.mark.parametrize("state", PARTIAL)
def test_resume_from_any_partial_state(tmp_path: Path, state: str, capsys) -> None:
    folder = tmp_path / schema.CHECKPOINTS
    tag = _checkpoint(folder, 2)
    make, usable = PARTIAL[state]
    make(folder, tag)
    resume = checkpoint_to_resume(folder, FINGERPRINT, discard=True)
    if usable:
        assert resume is not None and resume["step"] == 2
    else:
        assert resume is None and not folder.exists()  # discarded: training starts from step 0
        assert "discarding incomplete checkpoints" in capsys.readouterr().out
    assert checkpoint_to_resume(tmp_path / "none", FINGERPRINT, discard=True) is None


def test_older_version_checkpoints(tmp_path: Path) -> None:
    """latest.json without a listing or fingerprint (older sppo-train): a missing step folder is incomplete
    (a run killed mid-removal); a present one cannot be verified, so it is stale: refused, or discarded."""
    folder = tmp_path / schema.CHECKPOINTS
    tag = _checkpoint(folder, 2)
    store.write_json(folder / schema.LATEST_CHECKPOINT, {"tag": tag.name, "step": 2})
    with pytest.raises(store.StaleWorkError, match=r"no fingerprint \(made by an older sppo-train\)"):
        checkpoint_to_resume(folder, FINGERPRINT, discard=True)
    with discarding_stale():
        stale = stage_fingerprint("train", {}).with_layout(processes=1)
    assert checkpoint_to_resume(folder, stale, discard=True) is None and not folder.exists()
    _checkpoint(folder, 2)
    store.write_json(folder / schema.LATEST_CHECKPOINT, {"tag": "step-0000002", "step": 2})
    shutil.rmtree(folder / "step-0000002")
    assert checkpoint_to_resume(folder, FINGERPRINT, discard=True) is None and not folder.exists()


def test_only_rank_zero_removes(tmp_path: Path) -> None:
    folder = tmp_path / schema.CHECKPOINTS
    shutil.rmtree(_checkpoint(folder, 2))
    assert checkpoint_to_resume(folder, FINGERPRINT, discard=False) is None and folder.exists()


def test_remove_tree_renames_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill while the folder is being deleted leaves no half folder under its name, only trash that the next
    stage in that folder sweeps."""
    tag = _checkpoint(tmp_path / schema.CHECKPOINTS, 2)
    deleted: list[Path] = []

    def killed(path: Path) -> None:
        if path.name.endswith(".trash") and path.exists():
            next(path.rglob("*.pt")).unlink()  # the deletion had begun
            deleted.append(path)
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(store, "_remove", killed)
    with pytest.raises(KeyboardInterrupt):
        store.remove_tree(tmp_path / schema.CHECKPOINTS)
    assert not (tmp_path / schema.CHECKPOINTS).exists() and deleted[0].name == f".checkpoints.{os.getpid()}.trash"
    monkeypatch.undo()
    store.sweep_trash(tmp_path)
    assert list(tmp_path.iterdir()) == [] and not tag.exists()


def _train_into(out: Path, finished_run: Path, policy: Path, make_options: Callable) -> Path:
    options = make_options(save_steps=2)
    data = finished_run / "iter1" / schema.TRAIN_DATA.name
    return train.run_train(str(policy), data, out, options.train, options.model)


def test_rerun_after_a_kill_during_checkpoint_removal(
    finished_run: Path, policy: Path, tmp_path: Path, make_options: Callable, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Killed while checkpoints/ was removed after model/ was saved (step folder gone,
    latest.json left): the rerun used to die with DeepSpeed's bare AssertionError; now it starts over. And a
    kill during the removal that the stage itself does comes after its marker: the rerun skips the stage."""
    source = finished_run / "iter1"
    shutil.copytree(source / schema.CHECKPOINTS, tmp_path / schema.CHECKPOINTS)
    shutil.copytree(source / schema.MODEL_DIR, tmp_path / schema.MODEL_DIR)
    latest = store.read_json(tmp_path / schema.CHECKPOINTS / schema.LATEST_CHECKPOINT)
    shutil.rmtree(tmp_path / schema.CHECKPOINTS / latest["tag"])

    real = train.remove_tree

    def killed_during_removal(path: Path) -> None:
        if Path(path).name != schema.CHECKPOINTS or store.stage_summary(Path(path).parent, "train") is None:
            return real(path)  # old steps, or the incomplete checkpoints discarded at the start
        os.replace(path, Path(path).with_name(".checkpoints.999.trash"))
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(train, "remove_tree", killed_during_removal)
    with pytest.raises(KeyboardInterrupt):
        _train_into(tmp_path, finished_run, policy, make_options)
    assert "discarding incomplete checkpoints" in capsys.readouterr().out
    assert store.stage_summary(tmp_path, "train") is not None  # the marker came first
    assert [m["step"] for m in store.read_jsonl(schema.METRICS.path(tmp_path))] == [1, 2, 3, 4]
    assert (tmp_path / ".checkpoints.999.trash").is_dir() and not (tmp_path / schema.CHECKPOINTS).exists()

    monkeypatch.undo()
    _train_into(tmp_path, finished_run, policy, make_options)
    assert "[train] finished earlier" in capsys.readouterr().out
    assert not (tmp_path / ".checkpoints.999.trash").exists()


def test_rerun_with_a_half_removed_step_folder(
    finished_run: Path, policy: Path, tmp_path: Path, make_options: Callable, capsys
) -> None:
    """latest.json left and its step folder half deleted: no DeepSpeed error, training starts over."""
    source = finished_run / "iter1"
    shutil.copytree(source / schema.CHECKPOINTS, tmp_path / schema.CHECKPOINTS)
    latest = store.read_json(tmp_path / schema.CHECKPOINTS / schema.LATEST_CHECKPOINT)
    _half(tmp_path / schema.CHECKPOINTS / latest["tag"])
    _train_into(tmp_path, finished_run, policy, make_options)
    printed = capsys.readouterr().out
    assert "discarding incomplete checkpoints" in printed and "resuming" not in printed
    assert [m["step"] for m in store.read_jsonl(schema.METRICS.path(tmp_path))] == [1, 2, 3, 4]
    assert not (tmp_path / schema.CHECKPOINTS).exists() and store.stage_summary(tmp_path, "train") is not None
