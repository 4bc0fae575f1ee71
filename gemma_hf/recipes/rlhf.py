"""RLHF (``gemma-hf rlhf``): a Gemma policy optimised against reward models and rule-based rewards
with TRL's RLOOTrainer (default) or GRPOTrainer, with KL regularisation towards an anchor.

Prompts are prompt-only records rendered in the family's chat format (the tokenizer carries our
chat template, so TRL's own templating writes exactly our format, one ``<bos>``); completions stop
at ``<end_of_turn>`` (the policy's generation_config lists it). Rewards are a weighted list of
reward-model run directories and ``module:function`` callables (gemma_hf.rl.rewards). The KL
anchor is the initial policy, or with ``ema_anchor: mu`` an exponential moving average of the
policy, ``anchor <- (1 - mu) * anchor + mu * policy`` after every step (WARP's EMA anchor; TRL's
SyncRefModelCallback with ``ref_model_mixup_alpha = mu``, ``ref_model_sync_steps = 1``).

Held-out results before and after (eval.json): mean reward (total and per reward), KL to the
initial policy per token on the policy's own samples, response length, share of turns ended;
plots/rl.png shows reward and KL over training.

Library behaviours relied on (TRL 1.16): the trainers create the KL reference model from
``model.config._name_or_path`` (we point it at the run's saved initial policy, ``.init/``), stop
generation at the policy's ``generation_config.eos_token_id`` (+ the tokenizer's eos) and pass
``completion_ids`` and the dataset's columns to reward functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gemma_hf.faults import fault_point
from gemma_hf.io import atomic_directory
from gemma_hf.rundir import read_metrics

from .methods import Method
from .plots import plot_series
from .runtime import load_model
from .schema import SampleArguments

ALGORITHMS = ("rloo", "grpo")
RLOO_ONLY = ("normalize_advantages", "reward_clip_range")


@dataclass
class RLHFArguments(SampleArguments):
    rl_algorithm: str = field(
        default="rloo", metadata={"help": "rloo (TRL RLOOTrainer) or grpo (TRL GRPOTrainer).", "choices": list(ALGORITHMS)})
    rewards: list[dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "The rewards, each {model: REWARD_RUN_DIR, weight: w} or {function: module:function, weight: "
                          "w}; rule-based ones are in gemma_hf.rl.rules (ends_turn, no_repetition, chat_health, ...)."},
    )
    ema_anchor: float | None = field(
        default=None,
        metadata={"help": "WARP's EMA anchor: the KL reference becomes an exponential moving average of the policy, "
                          "anchor <- (1 - mu) * anchor + mu * policy every step (mu in (0, 1]); null: the initial "
                          "policy stays the anchor."},
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "Training prompts longer than this (tokens) are dropped."})
    eval_max_new_tokens: int = field(
        default=64, metadata={"help": "Held-out evaluation: most new tokens per sampled answer."})
    eval_max_prompts: int | None = field(
        default=None, metadata={"help": "Held-out evaluation: at most this many of the held-out prompts (the first of "
                                        "the split; null: all). The rest stay held out (never trained on)."})
    eval_temperature: float = field(
        default=1.0, metadata={"help": "Held-out evaluation: sampling temperature of the answers whose reward and "
                                       "KL to the initial policy are measured."})


def evaluation_prompts(eval_set, limit: int | None) -> tuple[list, dict]:
    """The held-out prompts an RLHF/WARP evaluation answers (the first ``limit``), with their other columns."""
    rows = len(eval_set) if limit is None else min(limit, len(eval_set))
    subset = eval_set.select(range(rows))
    return list(subset["prompt"]), {k: subset[k] for k in subset.column_names if k != "prompt"}


class RLHF(Method):
    name = "rlhf"
    title = "reinforcement learning from human feedback"
    help = "RLHF: RLOO or GRPO against reward models and rule-based rewards, KL to an (EMA) anchor"
    about = ("Reinforcement learning from feedback: a Gemma policy sampled on prompt-only data, scored by reward "
             "models and rule-based rewards (weighted), optimised with TRL's RLOO (default) or GRPO with a KL penalty "
             "towards the initial policy or an EMA anchor (WARP).")
    data_format = "prompt"
    head = "causal-lm"
    model_role = "policy"
    trainer_config = "trl:RLOOConfig"
    arguments = RLHFArguments
    refused_keys = {
        "reward_weights": "weights go with each entry of `rewards` ({..., weight: w}).",
        "sync_ref_model": "set `ema_anchor: mu` (the EMA anchor of WARP).",
        "ref_model_mixup_alpha": "set `ema_anchor: mu` (the EMA anchor of WARP).",
        "ref_model_sync_steps": "the EMA anchor is updated every step (`ema_anchor`).",
        "use_vllm": "generation runs in the trainer's own process here (vLLM is not wired).",
    }
    eval_on_start = False  # held-out reward/KL before training are our own pass

    def batches_records(self, recipe) -> bool:
        return False  # a step's batch is generations of prompts (num_generations per prompt)

    def check(self, c) -> None:
        from gemma_hf.rl.rewards import RewardSpecError, check_specs, parse_specs

        args, t, m = c.recipe.method_args, c.recipe.training, c.recipe.model
        if args.rewards is None:
            c.error("rewards", "missing: RLHF needs at least one reward",
                    "add `rewards:` with {model: REWARD_RUN_DIR} and/or {function: gemma_hf.rl.rules:chat_health}")
        else:
            try:
                specs = parse_specs(args.rewards)
            except RewardSpecError as err:
                c.error(err.key, err.message, err.fix)
            else:
                for key, message, fix in check_specs(specs):
                    c.error(key, message, fix)
                if all(spec.weight == 0 for spec in specs):
                    c.error("rewards", "every reward's weight is 0: the policy would train on a constant reward of 0 "
                            "(only the KL term would act)", "give at least one reward a non-zero weight")
        if args.ema_anchor is not None:
            c.in_range("ema_anchor", args.ema_anchor, 0 < args.ema_anchor <= 1, "a number in (0, 1]")
            if t.beta == 0:
                c.error("ema_anchor", "is set, but beta is 0: there is no KL term, so no anchor",
                        "set beta > 0 (e.g. 0.05), or remove ema_anchor")
            if m.use_peft:
                c.error("ema_anchor", "an EMA anchor needs a full copy of the policy; TRL's ref-model sync refuses "
                        "PEFT models", "fine-tune fully (use_peft: false) or remove ema_anchor")
        c.in_range("max_prompt_length", args.max_prompt_length, args.max_prompt_length >= 1, "1 or more")
        c.in_range("eval_max_new_tokens", args.eval_max_new_tokens, args.eval_max_new_tokens >= 1, "1 or more")
        c.in_range("eval_max_prompts", args.eval_max_prompts, args.eval_max_prompts is None or args.eval_max_prompts >= 1,
                   "1 or more, or null (all held-out prompts)")
        c.in_range("eval_temperature", args.eval_temperature, args.eval_temperature >= 0, "0 (greedy) or more")
        c.in_range("beta", t.beta, t.beta >= 0, "0 (no KL) or more")
        c.in_range("temperature", t.temperature, t.temperature > 0, "a positive number")
        if t.num_generations is not None:
            c.in_range("num_generations", t.num_generations, t.num_generations >= 2,
                       "2 or more (RLOO and GRPO compare completions of one prompt)")
        if args.rl_algorithm == "grpo":
            for key in RLOO_ONLY:
                if c.given(key):
                    c.error(key, "is an RLOO option", "remove it, or use rl_algorithm: rloo")

    def prepare(self, run, dataset, split: str):
        from gemma_hf.chat import encode_chat

        tokenizer, family = run.tokenizer, run.family
        limit = run.recipe.method_args.max_prompt_length
        lengths = [len(encode_chat(tokenizer, r["prompt"], family, add_generation_prompt=True)) for r in dataset]
        keep = [i for i, n in enumerate(lengths) if n <= limit or split == "eval"]
        stats = {"examples": len(dataset), "long_prompts": len(dataset) - len(keep), "handling": "drop"}
        dataset = dataset.select(keep) if len(keep) < len(dataset) else dataset
        if "reference" in dataset.column_names and all(r is None for r in dataset["reference"]):
            dataset = dataset.remove_columns(["reference"])
        return dataset, stats

    def rewards(self, run):
        if "_rewards" not in run.info:
            from gemma_hf.rl import rules
            from gemma_hf.rl.rewards import load_rewards, parse_specs

            rules.configure(run.tokenizer, getattr(run.recipe.training, "max_completion_length", None))
            run.info["_rewards"] = load_rewards(parse_specs(run.recipe.method_args.rewards), device=run.state.device)
        return run.info["_rewards"]

    def configure_model(self, run, model) -> None:
        # TRL builds the KL reference from config._name_or_path: the run's own copy of the initial
        # policy (.init/), so that a preset's random init, a run directory and a Hub id all work.
        init = run.rundir / ".init"
        if run.is_main and not (init / "config.json").is_file():
            with atomic_directory(init, overwrite=True) as tmp:  # output_dir exists: the engine wrote its marker
                model.save_pretrained(tmp)
            fault_point("rlhf:init")  # output_dir holds the marker and .init/ only (a CI kill once fell here)
        run.state.wait_for_everyone()
        model.config._name_or_path = str(init)
        model.name_or_path = str(init)

    def init_model(self, run):
        if "_init_model" not in run.info:
            model, _ = load_model(str(run.rundir / ".init"), "causal-lm", dtype=run.recipe.model.dtype)
            run.info["_init_model"] = model.eval().to(run.state.device)
        return run.info["_init_model"]

    def evaluate(self, run, model, eval_set, when: str) -> dict:
        from gemma_hf.rl.metrics import policy_metrics

        args = run.recipe.method_args
        prompts, columns = evaluation_prompts(eval_set, args.eval_max_prompts)
        return policy_metrics(model, None if when == "before" else self.init_model(run), run.tokenizer,
                              prompts, run.family, self.rewards(run),
                              max_new_tokens=args.eval_max_new_tokens, temperature=args.eval_temperature,
                              seed=run.recipe.training.seed, batch_size=run.recipe.training.per_device_eval_batch_size,
                              columns=columns) | ({"kl_to_init": 0.0} if when == "before" else {})

    def make_trainer(self, run, model, train_set, eval_set):
        from trl import GRPOConfig, GRPOTrainer, RLOOTrainer

        from gemma_hf.rl.trl_patches import score_labelled_positions_only

        score_labelled_positions_only()
        args = run.recipe.method_args
        kwargs = run.trainer_kwargs(model, train_set, eval_set)
        funcs, classes, weights, _ = self.rewards(run)
        config = kwargs.pop("args")
        config.reward_weights = weights
        if args.ema_anchor is not None:
            config.sync_ref_model, config.ref_model_mixup_alpha, config.ref_model_sync_steps = True, args.ema_anchor, 1
        trainer_class = RLOOTrainer
        if args.rl_algorithm == "grpo":
            shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                      if f.init and f.name not in RLOO_ONLY}
            config = GRPOConfig(**{k: v for k, v in shared.items() if k in {f.name for f in dataclasses.fields(GRPOConfig)}})
            trainer_class = GRPOTrainer
        return trainer_class(args=config, reward_funcs=funcs, reward_processing_classes=classes, **kwargs)

    def plots(self, run, results, directory) -> list[str]:

        metrics = read_metrics(run.rundir.metrics)
        series = {name: [(r["step"], r[name]) for r in metrics if isinstance(r.get(name), (int, float))]
                  for name in ("reward", "kl", "completions/mean_length")}
        series = {k: v for k, v in series.items() if v}
        if not series:
            return []
        plot_series(series, directory / "rl.png", f"{run.recipe.method}: reward and KL over training")
        return ["rl.png"]

    def run_info(self, run) -> dict:
        args, t = run.recipe.method_args, run.recipe.training
        return {"rl_algorithm": args.rl_algorithm, "rewards": args.rewards, "beta": t.beta,
                "ema_anchor": args.ema_anchor, "num_generations": t.num_generations}

    def summary(self, results: dict) -> list[str]:
        lines = []
        for name, label in (("reward", "held-out mean reward"), ("kl_to_init", "held-out KL to the initial policy "
                                                                               "per token"),
                            ("length", "held-out answer length (tokens)"), ("ended_turn", "held-out turns ended")):
            before, after = results.get(f"{name}_before"), results.get(f"{name}_after")
            if before is not None or after is not None:
                show = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
                lines.append(f"{label}: {show(before)} -> {show(after)}")
        return lines


METHOD = RLHF()

__all__ = ["RLHF", "RLHFArguments", "METHOD"]
