"""Checkpoints under faults: the previous checkpoint is kept; a truncated, empty or garbage latest
falls back to it with a warning; with none readable, `--resume` is one line and exit code 2."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lte_ray.checkpoint import CHECKPOINT, PREVIOUS, checkpoint_meta, load_checkpoint, save_checkpoint
from lte_ray.cli import _resumable, main
from lte_ray.errors import UserError
from lte_ray.resolve import build_config


def _meta(round_: int) -> dict:
    return {"round": round_, "next_head_id": 2, "counters": {"heads_joined": 0}, "samples_seen": 640 * round_,
            "wall_seconds": 1.5 * round_, "mlflow_run_id": "abc", "run_name": "t", "config": {}}


def _state(round_: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(round_)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g),
            "replica.norm": torch.randn(8, generator=g).to(torch.bfloat16)}


@pytest.fixture
def two_rounds(tmp_path):
    """A run folder with the checkpoints of rounds 1 and 2: round 2 latest, round 1 previous."""
    for r in (1, 2):
        save_checkpoint(tmp_path, _state(r), _meta(r))
    return tmp_path


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


def _garbage(path):
    path.write_bytes(os.urandom(path.stat().st_size))


def _foreign(path):  # a valid safetensors file, but not ours: no lte_ray metadata
    save_file({"x": torch.zeros(3)}, str(path))


def _delete(path):
    path.unlink()


FAULTS = {"truncated": _truncate, "empty": _empty, "garbage": _garbage, "foreign": _foreign}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _read_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lte_ray"])


def test_a_save_keeps_the_previous_checkpoint_and_its_data(two_rounds):
    state, meta = load_checkpoint(two_rounds)
    assert meta == _meta(2) and _same(state, _state(2))
    state, meta = _read_file(two_rounds / PREVIOUS)
    assert meta == _meta(1) and _same(state, _state(1))
    save_checkpoint(two_rounds, _state(3), _meta(3))
    for name, round_ in ((CHECKPOINT, 3), (PREVIOUS, 2)):
        state, meta = _read_file(two_rounds / name)
        assert meta == _meta(round_) and _same(state, _state(round_))
    assert sorted(p.name for p in two_rounds.iterdir()) == [PREVIOUS, CHECKPOINT]  # no temp files left


@pytest.mark.parametrize("reader", ["load_checkpoint", "checkpoint_meta"])
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_an_unreadable_latest_falls_back_to_the_previous_with_a_warning(two_rounds, fault, reader, caplog):
    FAULTS[fault](two_rounds / CHECKPOINT)
    with caplog.at_level(logging.WARNING, logger="lte_ray.checkpoint"):
        if reader == "load_checkpoint":
            state, meta = load_checkpoint(two_rounds)
            assert _same(state, _state(1))
        else:
            meta = checkpoint_meta(two_rounds)
    assert meta == _meta(1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and CHECKPOINT in warnings[0] and "using checkpoint.prev.safetensors (round 1)" in \
        warnings[0], warnings


def test_both_readers_pick_the_same_file_and_warn_once(two_rounds, caplog):
    _truncate(two_rounds / CHECKPOINT)
    with caplog.at_level(logging.WARNING, logger="lte_ray.checkpoint"):
        assert checkpoint_meta(two_rounds)["round"] == load_checkpoint(two_rounds)[1]["round"] == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # the driver reads it twice


def test_a_crash_between_the_renames_leaves_the_old_latest_as_previous(two_rounds, monkeypatch):
    real = os.replace

    def crash_on_the_second(src, dst):
        if str(dst).endswith(CHECKPOINT):
            raise OSError("simulated crash")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_second)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(two_rounds, _state(3), _meta(3))
    monkeypatch.undo()
    assert sorted(p.name for p in two_rounds.iterdir()) == [PREVIOUS]  # the temp file is gone
    state, meta = load_checkpoint(two_rounds)
    assert meta == _meta(2) and _same(state, _state(2))


def _resumable_run(folder):
    (folder / "config.yaml").write_text(yaml.safe_dump(build_config({}, {"output": str(folder)}).to_dict()))
    return folder


def test_resume_accepts_a_run_with_only_the_previous_checkpoint(two_rounds):
    _resumable_run(two_rounds)
    (two_rounds / CHECKPOINT).unlink()
    assert _resumable(str(two_rounds)) == str(two_rounds / "config.yaml")
    assert checkpoint_meta(two_rounds) == _meta(1)


@pytest.mark.parametrize("latest,previous", [("truncated", "empty"), ("empty", "missing"), ("garbage", "garbage"),
                                             ("missing", "truncated"), ("foreign", "empty")])
def test_resume_with_no_readable_checkpoint_is_one_line_and_exit_2(two_rounds, latest, previous, capsys):
    _resumable_run(two_rounds)
    for name, fault in ((CHECKPOINT, latest), (PREVIOUS, previous)):
        {**FAULTS, "missing": _delete}[fault](two_rounds / name)
    assert main(["train", "--quiet", "--resume", str(two_rounds)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lte-ray: error: --resume: no readable checkpoint in "), lines
    assert f"{CHECKPOINT}: " in lines[0] and f"{PREVIOUS}: " in lines[0]
    assert "Traceback" not in captured.err + captured.out
    with pytest.raises(UserError, match="^no readable checkpoint"):
        load_checkpoint(two_rounds)  # the coordinator's reader says the same, as a UserError


def test_no_checkpoint_at_all_is_not_an_error_for_the_readers(tmp_path, capsys):
    assert checkpoint_meta(tmp_path) is None
    _resumable_run(tmp_path)
    assert main(["train", "--quiet", "--resume", str(tmp_path)]) == 2
    assert "has no checkpoint yet" in capsys.readouterr().err
