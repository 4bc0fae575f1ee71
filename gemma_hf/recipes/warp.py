"""WARP (``gemma-hf warp``): Weight Averaged Rewarded Policies (Ramé et al. 2024), as stages of one
run directory.

Iteration i (of ``warp_iterations``) starts from θ_init,i (the recipe's model for i = 0):

(a) ``warp_runs`` = M RLHF runs (gemma_hf.recipes.rlhf, the same recipe, seeds ``warp_seeds``),
    each with an EMA anchor: the KL reference is θ_ema <- (1 - μ) θ_ema + μ θ after every step
    (``ema_anchor: μ``);
(b) their task vectors δ_m = θ_m - θ_init,i are merged by spherical interpolation, folded over the
    runs: merged_1 = δ_1, merged_m = slerp(merged_{m-1}, δ_m, 1/m) (gemma_hf.merging.slerp_merge);
(c) LITI: θ_η = (1 - η) θ_init,i + η (θ_init,i + merged) for each η of ``warp_etas``;
(d) θ_init,i+1 = θ_η for η = ``warp_eta``; the last one is the run's final model.

Every run, merge and LITI point is a stage under ``output_dir/stages/iter-I/``: an RLHF run
directory (resumable from its checkpoints, skipped when finished) or a model directory written
atomically (skipped when present). A kill at any instant and a re-run (with --resume) finishes
the job without redoing a finished stage. The held-out Pareto view of the last iteration -- (KL to
θ_init, reward) of the M runs, their SLERP merge and each LITI point -- goes to eval.json, to
plots/pareto.png and to the card.

Every Pareto point is measured on the same ``eval_max_prompts`` held-out prompts and comes with
95% intervals of its reward and its KL to θ_init, and with its reward gain over θ_init (its reward
minus θ_init's, prompt by prompt) and that gain's interval: one percentile bootstrap over the
prompts (``bootstrap_resamples`` draws, seeded by ``seed``), the same draws for every point, so the
gains are paired (gemma_hf.rl.metrics.paired_intervals). A gain whose interval excludes 0 is one
the prompts can tell apart from θ_init.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import PartialState

from gemma_hf.chat import install_chat_template
from gemma_hf.faults import fault_point
from gemma_hf.io import atomic_directory, sha256_file
from gemma_hf.merging import liti, slerp_merge
from gemma_hf.references import identity
from gemma_hf.rl.metrics import paired_intervals, policy_metrics
from gemma_hf.rundir import STAGES, RunDir, read_metrics, weight_files, write_json, write_metrics, write_text

from .config import load_recipe
from .data import held_out_seed
from .distributed import on_main_process
from .engine import run_recipe, write_marker
from .plots import Point, plot_points
from .publish import copy_model, finish, open_staging, record
from .rlhf import RLHF, RLHFArguments, evaluation_prompts
from .runtime import (Run, RunResult, build_model, load_model, load_tokenizer, prepare_splits, read_mixture,
                      set_generation_stops)
from .schema import plain, shareable

WARP_KEYS = ("warp_runs", "warp_seeds", "warp_iterations", "warp_etas", "warp_eta", "warp_eval", "bootstrap_resamples")
CONFIDENCE = 0.95  # of the Pareto view's intervals


@dataclass
class WarpArguments(RLHFArguments):
    warp_runs: int = field(default=2, metadata={"help": "M: RL runs per iteration, from the same init, seeds warp_seeds."})
    warp_seeds: list[int] | None = field(
        default=None, metadata={"help": "One seed per run (default: seed, seed + 1, ...)."})
    warp_iterations: int = field(default=1, metadata={"help": "I: iterations; each starts from the last's LITI point."})
    warp_etas: list[float] = field(
        default_factory=lambda: [0.3, 0.5, 1.0],
        metadata={"help": "LITI points eta in [0, 1]: (1 - eta) * init + eta * (init + merged task vector)."})
    warp_eta: float = field(
        default=0.5, metadata={"help": "The eta whose LITI point becomes the next init (and the final model)."})
    warp_eval: bool = field(
        default=True, metadata={"help": "Measure the held-out Pareto view (KL to init, reward) of the last iteration."})
    bootstrap_resamples: int = field(
        default=1000, metadata={"help": "Bootstrap resamples (over the held-out prompts, seeded by seed) of the Pareto "
                                        "view's 95% intervals."})


class Warp(RLHF):
    name = "warp"
    title = "WARP (weight-averaged rewarded policies)"
    help = "WARP: M RLHF runs with an EMA anchor, SLERP of their task vectors, LITI, iterated"
    about = ("WARP (Rame et al. 2024): M RLHF runs from one init with EMA anchors, merged by spherical interpolation of "
             "their task vectors, then interpolated towards the init (LITI); the chosen point starts the next "
             "iteration. Every run and merge is a resumable stage of one run directory.")
    arguments = WarpArguments

    def check(self, c) -> None:
        super().check(c)
        args, t = c.recipe.method_args, c.recipe.training
        c.in_range("warp_runs", args.warp_runs, args.warp_runs >= 1, "1 or more (2 or more to merge anything)")
        c.in_range("warp_iterations", args.warp_iterations, args.warp_iterations >= 1, "1 or more")
        if args.warp_seeds is not None:
            if len(args.warp_seeds) != args.warp_runs or len(set(args.warp_seeds)) != len(args.warp_seeds):
                c.error("warp_seeds", f"needs {args.warp_runs} distinct seeds (warp_runs), got {args.warp_seeds}",
                        "give one distinct seed per run, or remove the key")
            elif not all(0 <= s < 2**32 for s in args.warp_seeds):
                c.error("warp_seeds", "seeds must be in [0, 2**32)", "use smaller seeds")
        if not args.warp_etas or not all(0 <= e <= 1 for e in args.warp_etas):
            c.error("warp_etas", f"{args.warp_etas} must be a non-empty list of numbers in [0, 1]", "e.g. [0.3, 0.5, 1.0]")
        c.in_range("warp_eta", args.warp_eta, 0 <= args.warp_eta <= 1, "a number in [0, 1]")
        c.in_range("bootstrap_resamples", args.bootstrap_resamples, args.bootstrap_resamples >= 100, "100 or more")
        if args.ema_anchor is None:
            c.error("ema_anchor", "missing: WARP's KL anchor is an EMA of the policy", "set ema_anchor, e.g. 0.01")
        if t.max_steps is None or t.max_steps < 1:
            c.error("max_steps", "WARP's runs need a fixed number of steps", "set max_steps")

    def seeds(self, recipe) -> list[int]:
        args = recipe.method_args
        return list(args.warp_seeds) if args.warp_seeds else [recipe.training.seed + m for m in range(args.warp_runs)]

    # -- the run: stages in the run directory the engine opened ----------------------------------
    orchestrates = True

    def orchestrate(self, run: Run) -> RunResult:
        # Under `accelerate launch`, every process takes part in each RL run (an ordinary run_recipe);
        # the initial model, the merges, the Pareto view and the publish are the main process's alone.
        return self._run_stages(run)

    def _run_stages(self, run: Run):
        recipe, rundir, state, started, start = run.recipe, run.rundir, run.state, run.started, run.start_time
        args = recipe.method_args
        stages = rundir / STAGES
        init = stages / "init-0"

        def prepare():
            write_marker(run)  # the recipe's values: a resume after an edit is refused (engine.claim_output_dir)
            for leftover in stages.glob("**/.*.tmp-*") if stages.exists() else []:
                shutil.rmtree(leftover, ignore_errors=True)  # a merge a kill cut short: redone below
            if not (init / "config.json").is_file():
                self._save_initial_model(recipe, init)

        on_main_process(state, prepare, "the WARP run's initial model")
        history: list[dict[str, Any]] = []
        for iteration in range(args.warp_iterations):
            here = stages / f"iter-{iteration}"
            runs = []
            for m, seed in enumerate(self.seeds(recipe)):
                run_dir = here / f"run-{m}"
                runs.append(run_dir)
                history.append(self._rl_stage(recipe, init, run_dir, seed, f"iter-{iteration}/run-{m}"))
                fault_point(f"warp:iter-{iteration}/run-{m}")
            merged = here / "slerp"
            etas = sorted(set([*args.warp_etas, args.warp_eta]))
            points = {eta: here / f"liti-{eta:g}" for eta in etas}

            def merge(init=init, runs=runs, merged=merged, points=points, iteration=iteration) -> list[dict]:
                done = [self._model_stage(merged, f"iter-{iteration}/slerp", lambda out: slerp_merge(
                    init, runs, out) if len(runs) > 1 else copy_model(runs[0], out))]
                fault_point(f"warp:iter-{iteration}/slerp")
                missing = [eta for eta, path in points.items() if not (path / "config.json").is_file()]
                if missing:
                    started_at = time.time()
                    liti(init, merged, [eta for eta in missing], [points[eta] for eta in missing])
                    done.append({"stage": f"iter-{iteration}/liti", "etas": missing,
                                 "seconds": round(time.time() - started_at, 1)})
                else:
                    done.append({"stage": f"iter-{iteration}/liti", "skipped": True})
                fault_point(f"warp:iter-{iteration}/liti")
                return done

            history += on_main_process(state, merge, f"the WARP merges of iteration {iteration}")
            last_init, init = init, points[args.warp_eta]

        def finish():
            results, plots = ({}, {})
            if args.warp_eval:
                results, plots = self._pareto(recipe, rundir, last_init, runs, merged, points)
            return self._publish(recipe, rundir, init, history, results, plots, started, start, runs)

        return on_main_process(state, finish, "the WARP run's Pareto view and publish")

    def _save_initial_model(self, recipe, init: Path) -> None:
        """θ_init of the first iteration as a model directory (a preset's seeded random weights, or a copy)."""
        model, _ = build_model(recipe, "causal-lm")
        tokenizer = load_tokenizer(recipe)
        set_generation_stops(model, tokenizer)
        install_chat_template(tokenizer, recipe.family)
        with atomic_directory(init, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    def _rl_stage(self, recipe, init: Path, run_dir: Path, seed: int, name: str) -> dict:
        if RunDir(run_dir).is_finished():
            return {"stage": name, "skipped": True, **_stage_numbers(run_dir)}
        values = {k: plain(v) for k, v in recipe.values.items() if k not in WARP_KEYS}
        for key in ("preset", "preset_overrides"):
            values.pop(key, None)
        # Every run holds out the same records as the WARP recipe (its training seed differs, not its
        # split): the runs never train on the prompts of the Pareto view, and their numbers compare.
        values.update(output_dir=str(run_dir), seed=seed, model_name_or_path=str(init),
                      tokenizer_name_or_path=str(init), split_seed=held_out_seed(recipe.data, recipe.training.seed))
        if recipe.method_args.warp_eval and recipe.data.test_split_size is not None:
            # The Pareto view measures the init and every run on the same prompts: the runs' own held-out
            # evaluations would repeat it (about 35 s per run on the demo's 270M, 8 prompts).
            values["eval_before_training"] = values["eval_after_training"] = False
        if recipe.env:
            values["env"] = dict(recipe.env)
        if "run_name" in values:  # each run its own tracker name (else rundir.run_name_of: WARP_DIR/iter-I/run-M)
            values["run_name"] = f"{values['run_name']}/{name}"
        sub = load_recipe(None, values=values, method="rlhf")
        started = time.time()
        if PartialState().is_main_process:
            print(f"== WARP stage {name}: RLHF from {init.name}, seed {seed} ==", flush=True)
        result = run_recipe(sub, resume=True)
        return {"stage": name, "seconds": round(time.time() - started, 1), "global_step": result.global_step,
                **_stage_numbers(run_dir)}

    def _model_stage(self, out: Path, name: str, make) -> dict:
        if (out / "config.json").is_file():
            return {"stage": name, "skipped": True}
        started = time.time()
        make(out)
        return {"stage": name, "seconds": round(time.time() - started, 1)}

    def _pareto(self, recipe, rundir, init: Path, runs: list[Path], merged: Path, points: dict[float, Path]):
        """Held-out (KL to init, reward) of the last iteration's runs, merge and LITI points, with their
        intervals (one bootstrap over the prompts, the same draws for every point)."""
        run = Run(recipe, self, rundir, PartialState())
        run.tokenizer = load_tokenizer(recipe)
        mixture = read_mixture(recipe, self)
        _, eval_set = prepare_splits(run, mixture)
        if eval_set is None:
            return {}, {}
        args = recipe.method_args
        init_model, _ = load_model(str(init), "causal-lm", dtype=recipe.model.dtype)
        init_model.eval()
        prompts, columns = evaluation_prompts(eval_set, args.eval_max_prompts)
        candidates = [("init", init, "init"), *[(f"run-{m}", path, "RL runs") for m, path in enumerate(runs)],
                      ("slerp", merged, "SLERP merge"),
                      *[(f"liti-{eta:g}", path, "LITI") for eta, path in sorted(points.items())]]
        table = []
        per_prompt: dict[str, dict] = {}
        measured: dict[str, dict] = {}  # weights' digest -> numbers: LITI at eta = 1 is the SLERP merge, byte for byte
        for label, path, group in candidates:
            digest = _weights_digest(path)
            if digest in measured:
                numbers = measured[digest]
            else:
                model = init_model if label == "init" else load_model(str(path), "causal-lm", dtype=recipe.model.dtype)[0].eval()
                numbers = policy_metrics(model, init_model, run.tokenizer, prompts, recipe.family, self.rewards(run),
                                         max_new_tokens=args.eval_max_new_tokens, temperature=args.eval_temperature,
                                         seed=recipe.training.seed, batch_size=recipe.training.per_device_eval_batch_size,
                                         columns=columns)
                measured[digest] = numbers
            # Every point so far, bootstrapped again: the draws depend on the prompts' count and the seed
            # only, so a point's intervals do not depend on the points measured after it.
            per_prompt[label] = numbers["_per_prompt"]
            intervals = paired_intervals(per_prompt, "init", num_resamples=args.bootstrap_resamples,
                                         confidence=CONFIDENCE, seed=recipe.training.seed)[label]
            row = {"point": label, "group": group, **{k: v for k, v in numbers.items() if not k.startswith("_")},
                   **intervals}
            table.append(row)
            print(f"  pareto {_point_line(row)}", flush=True)
        results = {"pareto": table, "pareto_intervals": {
            "confidence": CONFIDENCE, "method": "percentile bootstrap over prompts, the same draws for every point",
            "num_prompts": len(prompts), "num_resamples": args.bootstrap_resamples, "seed": recipe.training.seed,
            "reward_gain": "reward minus init's reward, paired prompt by prompt"}}
        for row in table:
            for name in ("reward", "kl_to_init", "reward_gain"):
                for suffix in ("", "_ci_low", "_ci_high"):
                    results[f"{name}_{row['point']}{suffix}"] = row.get(f"{name}{suffix}")
        groups: dict[str, list[Point]] = {}
        for row in table:
            groups.setdefault(row["group"], []).append(Point(
                row["kl_to_init"], row["reward"] or 0.0, row["point"].replace("liti-", "η="),
                x_interval=_interval(row, "kl_to_init"), y_interval=_interval(row, "reward")))
        return results, {"pareto.png": (plot_points, groups)}

    def _publish(self, recipe, rundir, final: Path, stages, results, plots, started, start, runs):
        staged = open_staging(rundir)
        copy_model(final, staged.path, into_existing=True)
        write_text(staged.recipe, recipe.to_yaml())
        metrics = []
        for path in sorted((rundir / STAGES).glob("iter-*/run-*")):
            name = f"{path.parent.name}/{path.name}"
            metrics += [{**row, "stage": name} for row in read_metrics(RunDir(path).metrics)]
        write_metrics(staged.metrics, metrics)
        for name, (plot, groups) in plots.items():
            note = results.get("pareto_intervals", {})
            plot(groups, staged.plots / name, "WARP, last iteration: held-out reward vs KL to its init\n"
                 f"(bars: {note.get('confidence', CONFIDENCE):.0%} intervals, bootstrap over "
                 f"{note.get('num_prompts', '?')} prompts)", "KL to init per token", "mean reward")
        if results:
            write_json(staged.eval_json, results)
        first = RunDir(runs[0]).read_run() if RunDir(runs[0]).is_finished() else {}
        args = recipe.method_args
        run_info = record(
            recipe.method, self.title, started, start,
            head="causal-lm",
            base_model=identity(recipe.model.model_name_or_path) or f"preset:{recipe.gemma.preset}",
            family=recipe.family,
            datasets=first.get("datasets", []),
            warp={"runs": args.warp_runs, "seeds": self.seeds(recipe), "iterations": args.warp_iterations,
                  "etas": args.warp_etas, "eta_carried": args.warp_eta, "ema_anchor": args.ema_anchor,
                  "final_model": str(final.relative_to(rundir.path))},
            stages=stages,
            global_step=sum(s.get("global_step", 0) for s in stages),
            rewards=shareable("rewards", args.rewards),
        )
        finish(rundir, staged, run_info)
        return RunResult(rundir.path, recipe.method, results, time.time() - start, run_info["global_step"])

    def summary(self, results: dict) -> list[str]:
        return [_point_line(r) for r in results.get("pareto") or []]


def _interval(row: dict, name: str) -> tuple[float, float] | None:
    low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    return None if low is None or high is None else (low, high)


def _with_interval(row: dict, name: str, digits: int, sign: str = "") -> str:
    """``value [low, high]`` of a Pareto row's ``name`` ("-" when it was not measured)."""
    value = row.get(name)
    if value is None:
        return "-"
    interval = _interval(row, name)
    text = f"{value:{sign}.{digits}f}"
    return text if interval is None else f"{text} [{interval[0]:{sign}.{digits}f}, {interval[1]:{sign}.{digits}f}]"


def _point_line(row: dict) -> str:
    """One Pareto point, as the console and the summary print it: each number with its interval."""
    line = (f"{row['point']:>10}: reward {_with_interval(row, 'reward', 4)}, "
            f"KL to init {_with_interval(row, 'kl_to_init', 4)}, length {row.get('length', 0):.1f}")
    if row["point"] != "init" and row.get("reward_gain") is not None:
        interval = _interval(row, "reward_gain")
        apart = "" if interval is None else " (apart from init)" if interval[0] > 0 or interval[1] < 0 else \
            " (not apart from init)"
        line += f", gain over init {_with_interval(row, 'reward_gain', 4, '+')}{apart}"
    return line


def _stage_numbers(run_dir: Path) -> dict:
    try:
        evaluation = json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: evaluation.get(k) for k in ("reward_before", "reward_after", "kl_to_init_after") if k in evaluation}


def _weights_digest(directory: Path) -> str:
    """A model directory's weight files, each by name and sha256: equal only for identical weights."""
    names = weight_files(Path(directory))
    if not names:  # nothing to compare: never taken for another point
        return f"path:{Path(directory).resolve()}"
    return " ".join(f"{name}:{sha256_file(Path(directory) / name)}" for name in names)


METHOD = Warp()

__all__ = ["Warp", "WarpArguments", "METHOD"]
