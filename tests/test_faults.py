"""Fault injection, for every method of the method table (each method's tiny recipe): kill -9 at
named points and at random instants, then --resume, gives exactly the uninterrupted run; two runs
into one output_dir; a full disk; divergence. The runs that are killed (SIGKILL) or hold a lock
another run meets are real subprocesses; resumes, refusals, divergence and the full disk run in the
test process (tests/faults.py: run_here).

The default run covers each method at a few points; `pytest -m faults` (CI runs it, `make
test-faults`) adds every named point and 10 random instants on the SFT recipe.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gemma_hf.assets import gemma_tokenizer_tiny, llamafactory_data
from gemma_hf.rundir import RunDir
from tests.assets import require
from tests.clirun import run_captured
from tests.faults import METHODS, REPO, assert_same_run, kill_after, run, run_here, start, tiny_recipe
from tests.faults import env as fault_env

KILL_POINTS = ["train", "publish:model", "publish:files", "publish:card", "publish:ready",
               "publish:checkpoints-moved", "publish:old-moved", "publish:swapped"]
DEFAULT_POINTS = ["train", "publish:files", "publish:old-moved"]
RANDOM_KILLS = 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Per method: an uninterrupted run, during which a second run into the same output_dir is tried."""
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    out = {}
    for method in METHODS:
        root = tmp_path_factory.mktemp(f"reference-{method}")
        run_dir = root / "run"
        began = time.time()
        first = start(method, run_dir)
        lock = root / ".run.lock"
        while not lock.exists() and first.poll() is None:
            time.sleep(0.05)
        locked = time.time() - began
        # The first run is frozen while it holds the lock, so that the second meets it running
        # whatever the machine's load (unfrozen, a short run could finish first).
        time.sleep(0.5)  # the lock file exists just before it is locked
        first.send_signal(signal.SIGSTOP)
        frozen = time.time()
        try:  # another process than the first: this one, in-process
            second = run_here(method, run_dir, "--learning_rate", "1e-3")
        finally:
            first.send_signal(signal.SIGCONT)
        thawed = time.time()
        stdout, stderr = first.communicate(timeout=900)
        # "locked": seconds from the start until the run holds its directory; "seconds": the whole
        # run, without the time it was frozen (the random kills draw their instants in between).
        out[method] = {"dir": run_dir, "locked": locked, "seconds": time.time() - began - (thawed - frozen),
                       "first": (first.returncode, stderr), "second": (second.returncode, second.stderr)}
    return out


@pytest.mark.parametrize("method", METHODS)
def test_a_second_run_into_the_same_output_dir_is_refused(reference, method):
    ref = reference[method]
    code, err = ref["first"]
    assert code == 0, err[-3000:]
    code, err = ref["second"]
    assert code == 2 and "is in use by another gemma-hf process (pid" in err and "Traceback" not in err, err[-3000:]
    rows = [json.loads(line) for line in (ref["dir"] / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], "eval_loss" in r or "eval_accuracy" in r, "loss" in r) for r in rows]
    assert len(steps) == len(set(steps)), "metrics.jsonl interleaves two runs"
    assert not (ref["dir"].parent / ".run.lock").exists()  # the lock goes with the run


@pytest.mark.parametrize("method", METHODS)
def test_a_finished_run_is_kept_and_resuming_it_is_a_no_op(reference, method, tmp_path):
    ref = reference[method]["dir"]
    copy = tmp_path / "run"
    shutil.copytree(ref, copy)
    before = (copy / "run.json").read_text()
    again = run_here(method, copy)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    resumed = run_here(method, copy, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (copy / "run.json").read_text() == before
    assert_same_run(copy, ref)


def _kill_and_resume(method, point, tmp_path, reference):
    """Killed at fault point `point` (SIGKILL), resumed: the uninterrupted run."""
    run_dir = tmp_path / "run"
    killed = run(method, run_dir, GEMMA_HF_KILL_AT=point)
    assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
    assert not RunDir(run_dir).is_finished() or point == "publish:swapped"
    resumed = run_here(method, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, reference[method]["dir"])


# Every method is killed during training. Publishing, checkpoint saving (full disk) and resume are
# the run core's, the same code for every method: the default suite kills sft and reward at three
# publish points, at a random instant and with a full disk; the long suite (make test-faults, which
# CI also runs) adds sft/reward's other publish points and the random-instant and full-disk cases of
# distill and rlhf. distill and rlhf are not killed while publishing (that code is finish_publish).
PUBLISH_METHODS = ("sft", "reward")


def _default_points(method: str) -> list[str]:
    # distill / rlhf: killed right after checkpoint-2 is complete, so the resume restores a trainer
    # mid-run (its running counts included: generated_by_* of distill once restarted from zero).
    return DEFAULT_POINTS if method in PUBLISH_METHODS else ["saved:checkpoint-2"]


@pytest.mark.parametrize(("method", "point"), [(m, p) for m in METHODS for p in _default_points(m)])
def test_kill_at_a_named_point_then_resume_equals_the_uninterrupted_run(reference, method, point, tmp_path):
    _kill_and_resume(method, point, tmp_path, reference)


@pytest.mark.faults
@pytest.mark.parametrize(("method", "point"),
                         [(m, p) for m in METHODS if m in PUBLISH_METHODS for p in KILL_POINTS
                          if p not in _default_points(m)])
def test_kill_at_every_named_point(reference, method, point, tmp_path):
    _kill_and_resume(method, point, tmp_path, reference)


@pytest.mark.faults
def test_rlhf_killed_after_saving_its_initial_policy_resumes(reference, tmp_path):
    # rlhf's configure_model writes .init/ into output_dir; a kill there once left a directory
    # without the run marker, which the resume then refused as "not a gemma-hf run directory".
    _kill_and_resume("rlhf", "rlhf:init", tmp_path, reference)


def _random_kills(method, count, seed, tmp_path, reference) -> list[float]:
    rng = random.Random(seed)
    # Between the moment the reference run held its directory and its end: the run is then loading,
    # training, checkpointing or publishing (before it, the process is still importing its libraries).
    locked, span = reference[method]["locked"], reference[method]["seconds"]
    instants = []
    for index in range(count):
        run_dir = tmp_path / f"run-{index}"
        at = rng.uniform(locked, span)
        process = start(method, run_dir)
        was_killed = kill_after(process, at)
        instants.append(round(at, 2) if was_killed else -1)
        resumed = run_here(method, run_dir, "--resume")
        assert resumed.returncode == 0, (at, resumed.stderr[-3000:])
        assert_same_run(run_dir, reference[method]["dir"])
        shutil.rmtree(run_dir)
    print(f"{method}: killed at {instants} s (-1: finished first); run takes {span:.1f} s")
    return instants


# Default suite: the run core's own methods (sft, reward); the long suite: every other method too.
CORE = [m for m in METHODS if m in PUBLISH_METHODS]
OTHERS = [m for m in METHODS if m not in PUBLISH_METHODS]


def _core_then_long(methods_default, methods_long):
    return [*methods_default, *[pytest.param(m, marks=pytest.mark.faults) for m in methods_long]]


@pytest.mark.parametrize("method", _core_then_long(CORE, OTHERS))
def test_kill_at_random_instants_then_resume(reference, method, tmp_path):
    _random_kills(method, 1, seed=sum(map(ord, method)), tmp_path=tmp_path, reference=reference)


@pytest.mark.faults
def test_kill_at_ten_random_instants_on_the_sft_recipe(reference, tmp_path):
    instants = _random_kills("sft", RANDOM_KILLS, seed=20261129, tmp_path=tmp_path, reference=reference)
    assert sum(i > 0 for i in instants) >= RANDOM_KILLS // 2  # most kills land while the run is going


# `gemma-hf eval` opens and publishes its directory through the same protocol as a training run
# (engine.open_run, recipes/publish.py): killed at any publish point, rerun with --resume, it ends
# as the uninterrupted evaluation; a kill before the ready marker leaves nothing to resume.
EVAL_POINTS = ["publish:files", "publish:card", "publish:ready", "publish:checkpoints-moved", "publish:old-moved",
               "publish:swapped"]
EVAL_DEFAULT = ["publish:card", "publish:old-moved"]


@pytest.fixture(scope="module")
def eval_reference(tmp_path_factory):
    require(llamafactory_data)
    root = tmp_path_factory.mktemp("eval-reference")
    recipe = root / "eval.yaml"
    recipe.write_text(yaml.safe_dump({**tiny_recipe("eval"), "bootstrap_resamples": 100, "max_new_tokens": 4}))
    done = run_captured(["eval", "--config", str(recipe), "--output_dir", str(root / "run")])
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe, root / "run"


def _eval_process(recipe: Path, out: Path, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemma_hf.cli", "eval", "--config", str(recipe), "--output_dir",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=fault_env(**environment))


def _assert_same_evaluation(out: Path, reference: Path) -> None:
    assert json.loads((out / "eval.json").read_text()) == json.loads((reference / "eval.json").read_text())
    assert (out / "evaluation.md").read_text() == (reference / "evaluation.md").read_text()
    assert json.loads((out / "run.json").read_text())["method"] == "eval"
    card = (out / "README.md").read_text()
    assert card.startswith("---") and "## Results" in card and "held-out loss" in card
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("point", [p if p in EVAL_DEFAULT else pytest.param(p, marks=pytest.mark.faults)
                                   for p in EVAL_POINTS])
def test_eval_killed_while_publishing_then_rerun_equals_the_uninterrupted_evaluation(eval_reference, point,
                                                                                      tmp_path):
    recipe, reference = eval_reference
    out = tmp_path / "run"
    killed = _eval_process(recipe, out, GEMMA_HF_KILL_AT=point)
    assert killed.returncode == -9, (point, killed.returncode, killed.stderr[-2000:])
    assert not RunDir(out).is_finished() or point == "publish:swapped"
    staged_ready = (tmp_path / ".run.publish" / ".publish-ready").is_file()
    assert staged_ready == (EVAL_POINTS.index(point) >= EVAL_POINTS.index("publish:ready") and point != "publish:swapped")
    again = run_captured(["eval", "--config", str(recipe), "--output_dir", str(out), "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same_evaluation(out, reference)


def test_a_finished_evaluation_is_kept(eval_reference, tmp_path):
    recipe, reference = eval_reference
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    again = run_captured(["eval", "--config", str(recipe), "--output_dir", str(copy)])
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    _assert_same_evaluation(copy, reference)


def test_a_publish_refused_on_the_way_leaves_no_staging_directory(tmp_path, monkeypatch):
    """Held-out results that are not finite refuse the publish after the final model was staged (issue 22,
    case 10: ~100 MB of staging were left beside the RL run): exit 1, the staging directory is removed, the run
    stays unfinished and resumable."""
    require(gemma_tokenizer_tiny)
    from gemma_hf.recipes import publish
    from gemma_hf.recipes.callbacks import TrainingDiverged

    def refuse(results):
        raise TrainingDiverged("held-out results are not finite (eval_loss_after); the run was not published.")

    monkeypatch.setattr(publish, "check_finite_results", refuse)
    run_dir = tmp_path / "run"
    result = run_here("sft", run_dir)
    assert result.returncode == 1 and "held-out results are not finite" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".run.publish").exists()
    assert RunDir(run_dir).state() == "unfinished" and RunDir(run_dir).latest_complete_checkpoint()[0] is not None


@pytest.mark.parametrize("method", METHODS)
def test_divergence_stops_the_run_unpublished(method, tmp_path):
    require(gemma_tokenizer_tiny)
    run_dir = tmp_path / "run"
    result = run_here(method, run_dir, "--learning_rate", "1e30", "--max_grad_norm", "0")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "training diverged at step" in result.stderr and "Traceback" not in result.stderr
    assert not (run_dir / "run.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.")]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return mounted.returncode == 0


@pytest.mark.parametrize("method", _core_then_long(CORE, OTHERS))
def test_a_full_disk_stops_the_run_resumably(reference, method, tmp_path):
    """The first checkpoint (~4.6 MB: weights + Adam states of the tiny model) does not fit on a 3 MB
    disk: exit 1 naming the full disk, no traceback, no checkpoint that counts; moved to a roomy disk,
    --resume finishes it and equals the uninterrupted run."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "3m"):
        pytest.skip("cannot mount a small tmpfs here (needs root); the full-disk path is not exercised")
    try:
        result = run_here(method, small / "run")
        assert result.returncode == 1, result.stderr[-3000:]
        assert "no space left on the device" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert RunDir(small / "run").latest_complete_checkpoint()[0] is None
        assert not (small / "run" / "run.json").exists()
        moved = tmp_path / "roomy" / "run"
        shutil.copytree(small / "run", moved)
    finally:
        # In-process, the failed run's traceback can outlive it (pytest keeps logged records), holding
        # a file on the small disk open: a lazy unmount detaches it now and finishes when that closes.
        if subprocess.run(["umount", str(small)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(small)], capture_output=True)
    resumed = run_here(method, moved, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(moved, reference[method]["dir"])
