"""Run-directory mechanics without training: checkpoint completeness, interrupted publishes, metrics."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from gemma_hf import rundir
from gemma_hf.recipes.callbacks import MetricsCallback
from gemma_hf.recipes.publish import PUBLISH_READY
from gemma_hf.recipes.publish import recover as recover_publish
from gemma_hf.rundir import RunDir, RunDirError


def make_checkpoint(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(path / "model.safetensors"))
    torch.save({"state": 1}, path / "optimizer.pt")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_latest_complete_checkpoint_skips_partial_ones(tmp_path):
    run = RunDir(tmp_path)
    make_checkpoint(run.checkpoints, 2)
    make_checkpoint(run.checkpoints, 10)
    partial = make_checkpoint(run.checkpoints, 12, complete=False)
    cut = make_checkpoint(run.checkpoints, 14, complete=False)
    (cut / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    latest, incomplete = run.latest_complete_checkpoint()
    assert latest.name == "checkpoint-10" and incomplete == [cut, partial]
    assert RunDir(tmp_path / "none").latest_complete_checkpoint() == (None, [])


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt"])
def test_a_checkpoint_with_cut_files_is_not_complete(tmp_path, victim):
    """trainer_state.json intact, but weights or optimizer state cut (a kill, a full disk)."""
    path = make_checkpoint(tmp_path / "checkpoints", 4)
    assert rundir.checkpoint_is_complete(path)
    data = (path / victim).read_bytes()
    (path / victim).write_bytes(data[: len(data) - 7])
    assert not rundir.checkpoint_is_complete(path)


def test_output_dir_states(tmp_path):
    out = RunDir(tmp_path / "run")
    assert out.state() == "absent"
    out.path.mkdir()
    assert out.state() == "absent"  # empty
    (out / f".{rundir.MARKER}.tmp-4242").write_text('{"meth')  # killed while writing the marker
    assert out.state() == "unfinished"
    (out / f".{rundir.MARKER}.tmp-4242").unlink()
    (out / ".init").mkdir()  # anything else without the marker is not provably ours
    assert out.state() == "foreign"
    (out / ".init").rmdir()
    (out / "notes.txt").write_text("mine")
    assert out.state() == "foreign"
    out.marker.write_text("{}")
    assert out.state() == "unfinished"
    out.run_json.write_text("{}")
    assert out.state() == "finished"


def test_publish_killed_between_renames_is_completed(tmp_path):
    out = RunDir(tmp_path / "run")
    # Killed after the finished directory was staged and the working one moved aside.
    staged = out.staging
    staged.path.mkdir()
    staged.run_json.write_text("{}")
    (staged / PUBLISH_READY).write_text("x")
    make_checkpoint(staged.checkpoints, 4)
    out.old.mkdir()
    assert recover_publish(out)
    assert out.is_finished() and (out.checkpoints / "checkpoint-4").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert not (out / PUBLISH_READY).exists()
    # Killed before the checkpoints moved: they move in, the working directory goes.
    out2 = RunDir(tmp_path / "run2")
    make_checkpoint(out2.checkpoints, 6)
    out2.marker.write_text("{}")
    staged2 = out2.staging
    staged2.path.mkdir()
    staged2.run_json.write_text("{}")
    (staged2 / PUBLISH_READY).write_text("x")
    assert recover_publish(out2)
    assert out2.is_finished() and (out2.checkpoints / "checkpoint-6").is_dir()
    assert not out2.marker.exists()
    assert not recover_publish(out2)  # nothing left to do


def test_an_unfinished_staging_directory_is_discarded(tmp_path):
    """Killed while the finished files were being written (no PUBLISH_READY yet): the run stays
    unfinished, its checkpoints where they were, and the half-written staging directory goes."""
    out = RunDir(tmp_path / "run")
    make_checkpoint(out.checkpoints, 6)
    out.marker.write_text("{}")
    out.staging.path.mkdir()
    out.staging.run_json.write_text("{}")
    assert not recover_publish(out)
    assert not out.staging.path.exists() and out.state() == "unfinished"
    assert (out.checkpoints / "checkpoint-6").is_dir()


def test_metrics_callback_drops_the_killed_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')

    class State:
        is_world_process_zero = True
        global_step = 4
        epoch = 0.5

    callback = MetricsCallback(path, fresh=False)
    callback.on_train_begin(None, State(), None)
    assert [r["step"] for r in rundir.read_metrics(path)] == [1, 2, 3, 4]
    callback.on_log(None, State(), None, logs={"loss": 0.5, "grad_norm": 1.0, "learning_rate": 1e-3})
    last = rundir.read_metrics(path)[-1]
    assert last["step"] == 4 and last["epoch"] == 0.5 and last["loss"] == 0.5


def test_metrics_reading_rule_is_the_same_for_writer_and_card(tmp_path):
    """A cut last line (no newline) is a kill and is dropped; any other bad line is corruption."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert [r["step"] for r in rundir.read_metrics(path)] == [1]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(RunDirError, match="metrics.jsonl:2 is not valid JSON"):
        rundir.read_metrics(path)
    path.write_text('{"loss": 2.0}\n')
    with pytest.raises(RunDirError, match="metrics.jsonl:1: each line must be a JSON object with a 'step'"):
        rundir.read_metrics(path)
