"""Run-directory mechanics without training: checkpoint completeness, interrupted publishes, metrics."""

from __future__ import annotations

import json

from gemma_hf.recipes import rundir


def make_checkpoint(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"w")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_latest_complete_checkpoint_skips_partial_ones(tmp_path):
    make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 10)
    partial = make_checkpoint(tmp_path, 12, complete=False)
    cut = make_checkpoint(tmp_path, 14, complete=False)
    (cut / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    latest, incomplete = rundir.latest_complete_checkpoint(tmp_path)
    assert latest.name == "checkpoint-10" and incomplete == [cut, partial]
    assert rundir.latest_complete_checkpoint(tmp_path / "none") == (None, [])


def test_output_dir_states(tmp_path):
    out = tmp_path / "run"
    assert rundir.describe_output_dir(out) == "absent"
    out.mkdir()
    assert rundir.describe_output_dir(out) == "absent"  # empty
    (out / "notes.txt").write_text("mine")
    assert rundir.describe_output_dir(out) == "foreign"
    (out / rundir.MARKER).write_text("{}")
    assert rundir.describe_output_dir(out) == "unfinished"
    (out / rundir.RUN_JSON).write_text("{}")
    assert rundir.describe_output_dir(out) == "finished"


def test_publish_killed_between_renames_is_completed(tmp_path):
    out = tmp_path / "run"
    # Killed after the finished directory was staged and the working one moved aside.
    staged = rundir.publish_dir(out)
    staged.mkdir()
    (staged / rundir.RUN_JSON).write_text("{}")
    make_checkpoint(staged / rundir.CHECKPOINTS, 4)
    old = rundir.old_dir(out)
    old.mkdir()
    assert rundir.recover_publish(out)
    assert rundir.is_finished(out) and (out / "checkpoints" / "checkpoint-4").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    # Killed before the checkpoints moved: they move in, the working directory goes.
    out2 = tmp_path / "run2"
    make_checkpoint(out2 / rundir.CHECKPOINTS, 6)
    (out2 / rundir.MARKER).write_text("{}")
    staged2 = rundir.publish_dir(out2)
    staged2.mkdir()
    (staged2 / rundir.RUN_JSON).write_text("{}")
    assert rundir.recover_publish(out2)
    assert rundir.is_finished(out2) and (out2 / "checkpoints" / "checkpoint-6").is_dir()
    assert not (out2 / rundir.MARKER).exists()
    assert not rundir.recover_publish(out2)  # nothing left to do


def test_metrics_callback_drops_the_killed_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')

    class State:
        is_world_process_zero = True
        global_step = 4
        epoch = 0.5

    callback = rundir.MetricsCallback(path)
    callback.on_train_begin(None, State(), None)
    assert [r["step"] for r in rundir.read_metrics(path)] == [1, 2, 3, 4]
    callback.on_log(None, State(), None, logs={"loss": 0.5, "grad_norm": 1.0, "learning_rate": 1e-3})
    last = rundir.read_metrics(path)[-1]
    assert last["step"] == 4 and last["epoch"] == 0.5 and last["loss"] == 0.5
