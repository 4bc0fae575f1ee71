"""Evaluation (``gemma-hf eval``): a model against a baseline on held-out prompts, with the
evaluation library (gemma_hf.evaluation): held-out loss on reference answers, chat-format health
(turns ended, empty answers, answers repeating the prompt, distinct-2), reward-model win rate, and
side-by-side with an LM judge (both orders, ties split, 95% bootstrap interval, as report 1's
Table 5), plus lm-evaluation-harness tasks when ``lm_eval`` is installed.

The held-out prompts are the recipe's datasets (prompt records; a final model turn or an
``output``/``completion`` column is the reference answer) -- with ``test_split_size`` and the seed
of a training recipe, exactly that recipe's held-out split. The output directory gets eval.json
(flat numbers + per-prompt samples), evaluation.md (the tables), run.json, recipe.yaml and a card
(README.md); it is opened and published like every run (engine.open_run, publish.py): atomically,
with the same fault points, and never overwritten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from gemma_hf.references import CAUSAL_LM, SEQUENCE_CLASSIFICATION, BadReference, identity, resolve
from gemma_hf.rundir import write_json, write_text

from .distributed import on_main_process
from .methods import Method
from .publish import finish, open_staging, record
from .runtime import Run, RunResult, prepare_splits, read_mixture


@dataclass
class EvalRunArguments:
    """What an evaluation needs of a "training" group: where, which seed, how many at once."""

    output_dir: str = field(default="", metadata={"help": "Where the evaluation's directory goes."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split and of the bootstrap."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Prompts answered or scored at once."})


@dataclass
class EvalArguments:
    baseline_name_or_path: str | None = field(
        default=None, metadata={"help": "The model compared against (a checkpoint or run directory, asset:NAME)."})
    reward_name_or_path: str | None = field(
        default=None, metadata={"help": "A reward-model run directory: reward win rate (or mean reward without a "
                                        "baseline)."})
    judge_name_or_path: str | None = field(
        default=None, metadata={"help": "A causal LM as side-by-side judge (needs a baseline)."})
    judge_template: str | None = field(
        default=None, metadata={"help": "The judge's prompt template file (default: gemma_hf/evaluation/templates/"
                                        "judge_side_by_side.txt)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Most new tokens per (greedy) answer."})
    heldout_loss: bool = field(default=True, metadata={"help": "Held-out loss on the reference answers."})
    bootstrap_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples of the win-rate intervals."})
    lm_eval_tasks: list[str] | None = field(
        default=None, metadata={"help": "lm-evaluation-harness tasks to run on the model (e.g. [arc_easy], or your own "
                                        "from lm_eval_include_path; needs the [eval] extra: pip install 'gemma_hf[eval]')."})
    lm_eval_include_path: str | None = field(
        default=None, metadata={"help": "A directory of your own lm-eval task YAML files (lm-eval's include_path); "
                                        "their data may be local files, e.g. dataset_path: json."})
    lm_eval_num_fewshot: int | None = field(
        default=None, metadata={"help": "Few-shot examples per lm-eval task (default: each task's own)."})
    lm_eval_limit: float | None = field(
        default=None, metadata={"help": "Documents per lm-eval task: a count (>= 1) or a fraction (< 1); default all."})


class Evaluate(Method):
    name = "eval"
    title = "evaluation"
    help = "evaluate a model against a baseline: held-out loss, chat health, reward win rate, LM-judge side-by-side"
    about = ("Evaluation of a model against a baseline on held-out prompts: held-out loss, chat-format health, "
             "reward-model win rate and an LM judge's side-by-side win rate with 95% bootstrap intervals.")
    data_format = "prompt"
    head = "causal-lm"
    model_role = "evaluated model"
    trainer_config = "gemma_hf.recipes.evaluate:EvalRunArguments"
    arguments = EvalArguments
    trains = False
    publishes_model = False

    def check(self, c) -> None:
        args = c.recipe.method_args
        seed = c.recipe.training.seed
        c.in_range("seed", seed, isinstance(seed, int) and 0 <= seed < 2**32, "an integer in [0, 2**32)")
        c.in_range("max_new_tokens", args.max_new_tokens, args.max_new_tokens >= 1, "1 or more")
        c.in_range("bootstrap_resamples", args.bootstrap_resamples, args.bootstrap_resamples >= 100, "100 or more")
        c.in_range("per_device_eval_batch_size", c.recipe.training.per_device_eval_batch_size,
                   c.recipe.training.per_device_eval_batch_size >= 1, "1 or more")
        if args.judge_name_or_path and not args.baseline_name_or_path:
            c.error("judge_name_or_path", "a side-by-side judgement needs a baseline",
                    "set baseline_name_or_path, or remove the judge")
        roles = {"baseline_name_or_path": ("baseline", CAUSAL_LM), "judge_name_or_path": ("judge", CAUSAL_LM),
                 "reward_name_or_path": ("reward model", SEQUENCE_CLASSIFICATION)}
        for key, (role, head) in roles.items():
            text = getattr(args, key)
            if text is None:
                continue
            try:
                ref = resolve(text, "model")
            except BadReference as err:
                (c.environment if err.environment else c.error)(key, err.message, err.fix)
                continue
            if ref.is_local and not (ref.path / "config.json").is_file():
                c.error(key, f"{ref.path} is not a model directory (no config.json)", "point it at a run directory")
            else:
                c.role(key, text, role, head)
        if args.judge_template is not None:
            from gemma_hf.evaluation.judge import check_template

            try:
                check_template(Path(args.judge_template).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                c.error("judge_template", str(err), "give a text file with {instruction}, {answer_a}, {answer_b}")
        if args.lm_eval_tasks:
            import importlib.util

            from gemma_hf.evaluation.harness import INSTALL_HINT

            if importlib.util.find_spec("lm_eval") is None:
                c.environment("lm_eval_tasks", "lm-evaluation-harness is not installed", INSTALL_HINT)
        lm_eval_keys = ("lm_eval_include_path", "lm_eval_num_fewshot", "lm_eval_limit")
        for key in lm_eval_keys:
            if getattr(args, key) is not None and not args.lm_eval_tasks:
                c.error(key, "set without lm_eval_tasks", "name the lm-eval tasks to run (lm_eval_tasks), or remove it")
        if args.lm_eval_include_path is not None and not Path(args.lm_eval_include_path).is_dir():
            c.error("lm_eval_include_path", f"{args.lm_eval_include_path} is not a directory",
                    "name a directory of lm-eval task YAML files")
        if args.lm_eval_num_fewshot is not None:
            c.in_range("lm_eval_num_fewshot", args.lm_eval_num_fewshot, args.lm_eval_num_fewshot >= 0, "0 or more")
        if args.lm_eval_limit is not None:
            limit = args.lm_eval_limit
            c.in_range("lm_eval_limit", limit, 0 < limit < 1 or (limit >= 1 and float(limit).is_integer()),
                       "a fraction in (0, 1) or a whole count of 1 or more")

    # -- the run: evaluated in the run directory the engine opened (lock, recovery, claim) ----------
    orchestrates = True

    def orchestrate(self, run: Run) -> RunResult:
        # Under `accelerate launch` (e.g. a pipeline's evaluation stage) the main process evaluates
        # and publishes the directory once; the others wait for its result.
        return on_main_process(run.state, lambda: self._evaluate(run), f"the evaluation into {run.rundir.path}")

    def _evaluate(self, run: Run) -> RunResult:
        import torch

        from gemma_hf.evaluation import Contestant, LMJudge, RewardModelScorer, evaluate, markdown_table

        recipe, rundir = run.recipe, run.rundir
        args, t = recipe.method_args, recipe.training
        mixture = read_mixture(recipe, self)
        train, held_out = prepare_splits(run, mixture)
        items = held_out if held_out is not None else train
        conversations = [{"prompt": r["prompt"], **({"reference": r["reference"]} if r.get("reference") else {})}
                         for r in items]
        device = run.state.device
        dtype = recipe.model.dtype if recipe.model.dtype not in (None, "auto") else "float32"

        def contestant(text: str):  # named by identity: never a local absolute path in eval.json
            return Contestant.from_pretrained(resolve(text, "model").location, identity(text), dtype=dtype,
                                              device=device)

        model = contestant(recipe.model.model_name_or_path)
        baseline = contestant(args.baseline_name_or_path) if args.baseline_name_or_path else None
        reward = RewardModelScorer.from_pretrained(resolve(args.reward_name_or_path, "reward model").location,
                                                   batch_size=t.per_device_eval_batch_size) \
            if args.reward_name_or_path else None
        judge = LMJudge.from_pretrained(resolve(args.judge_name_or_path, "judge").location, template=args.judge_template,
                                        batch_size=t.per_device_eval_batch_size) if args.judge_name_or_path else None
        with torch.no_grad():
            result = evaluate(model, conversations, baseline, reward=reward, judge=judge, loss=args.heldout_loss,
                              max_new_tokens=args.max_new_tokens, batch_size=t.per_device_eval_batch_size,
                              num_resamples=args.bootstrap_resamples, seed=t.seed,
                              reward_name=identity(args.reward_name_or_path),
                              judge_name=identity(args.judge_name_or_path))
        harness = None
        if args.lm_eval_tasks:
            from gemma_hf.evaluation import run_lm_eval

            limit = args.lm_eval_limit
            harness = run_lm_eval(
                resolve(recipe.model.model_name_or_path, "model").location, args.lm_eval_tasks,
                num_fewshot=args.lm_eval_num_fewshot, limit=int(limit) if limit is not None and limit >= 1 else limit,
                batch_size=t.per_device_eval_batch_size, device=str(device), dtype=dtype, seed=t.seed,
                include_path=args.lm_eval_include_path)
            result["summary"].update(harness["summary"])
            # by identity in eval.json: never a local absolute path
            harness["settings"].update(model=identity(recipe.model.model_name_or_path),
                                       include_path=identity(args.lm_eval_include_path))
        staged = open_staging(rundir)
        lm_eval_record = {"lm_eval": {k: harness[k] for k in ("results", "versions", "n-shot", "settings")}} if harness else {}
        write_json(staged.eval_json, {**result["summary"], "samples": result["samples"], "settings": result["settings"],
                                      **lm_eval_record})
        table = markdown_table(result)
        if harness:
            from gemma_hf.evaluation import markdown_lm_eval

            table += "\n" + markdown_lm_eval(harness)
        write_text(staged / "evaluation.md", table + "\n")
        write_text(staged.recipe, recipe.to_yaml())
        run_info = record(
            "eval", self.title, run.started, run.start_time,
            model=identity(recipe.model.model_name_or_path), baseline=identity(args.baseline_name_or_path),
            reward_model=identity(args.reward_name_or_path), judge=identity(args.judge_name_or_path),
            family=recipe.family, num_prompts=len(conversations),
            datasets=[{"path": identity(p.source.reference), "num_examples": n}
                      for p, n in zip(mixture.parts, mixture.taken)],
        )
        finish(rundir, staged, run_info)
        return RunResult(rundir.path, "eval", result["summary"], time.time() - run.start_time, 0)

    def prepare(self, run, dataset, split: str):
        return dataset, {"examples": len(dataset)}

    def summary(self, results: dict) -> list[str]:
        keys = ("model_heldout_loss", "baseline_heldout_loss", "model_ended_turn_rate", "baseline_ended_turn_rate",
                "model_repeat_prompt_rate", "model_distinct_2", "reward_win_rate", "judge_win_rate")
        from gemma_hf.evaluation.harness import is_metric

        keys += tuple(k for k in results if k.startswith("lm_eval/") and is_metric(k.rsplit("/", 1)[-1]))
        return [f"{k}: {results[k]:.4f}" for k in keys if isinstance(results.get(k), (int, float))]


METHOD = Evaluate()

__all__ = ["Evaluate", "EvalArguments", "EvalRunArguments", "METHOD"]
