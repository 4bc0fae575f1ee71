"""Bradley-Terry reward modelling (``gemma-hf reward``): TRL's RewardTrainer on preference pairs,
with GemmaHFForSequenceClassification (one output: the reward).

Each pair is rendered in the family's chat format as two whole conversations (prompt + chosen,
prompt + rejected; one ``<bos>``, the final model turn ending as in training), and the reward is the
score head's output at the last non-padding token. The loss is Bradley-Terry,
``-log sigmoid(r_chosen - r_rejected - margin)`` with an optional per-pair ``margin`` column, plus
TRL's optional reward-centring term ``center_rewards_coefficient * mean((r_chosen + r_rejected)^2)``.

The score head: a checkpoint that has one (a reward model) keeps it; otherwise (a causal LM, an
SFT run, a preset) it is new and initialised N(0, 1/((d_model + 1) r^2)), where r is the RMS of the
final hidden state measured on 8 training conversations. Stiennon et al. 2020 ("Learning to
summarize from human feedback") initialise their reward head N(0, 1/(d_model + 1)) for unit-scale
features; Gemma's final hidden states are far from unit scale (the norm's learned gain), so the
measured r keeps the initial rewards at unit variance (~N(0, 1)) and the first Bradley-Terry
gradients tame. With LoRA the head is fully trainable (PEFT's ``modules_to_save`` for SEQ_CLS)
and merged into the saved model.

Held-out results (eval.json, before and after training): pairwise accuracy (share of pairs whose
chosen answer gets the higher reward), mean margin ``r_chosen - r_rejected``, the Bradley-Terry
loss and the mean rewards; plots/reward_histogram.png shows the held-out reward distributions of
chosen and rejected answers before and after.

Library behaviours relied on (TRL 1.16):
- ``RewardTrainer`` takes a dataset with ``chosen_ids``/``rejected_ids`` (and ``margin``) as
  already tokenized, pads both halves to the right into one batch (chosen first) and splits the
  model's ``logits`` in two; it requires ``config.num_labels == 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gemma_hf.tokenization import encode_conversation

from .methods import HEADS, Method
from .plots import plot_histograms


@dataclass
class RewardArguments:
    long_examples: str = field(
        default="drop",
        metadata={
            "help": "Pairs whose chosen or rejected conversation is longer than max_length: drop them (training and "
            "held-out pairs, as TRL does; the counts go to run.json), or truncate both to max_length (keeping the "
            "start: the reward is then read mid-answer).",
            "choices": ["drop", "truncate"],
        },
    )
    score_init_std: float | None = field(
        default=None,
        metadata={"help": "Standard deviation of a new score head's weights; default 1/(r*sqrt(d_model + 1)) with r "
                          "the RMS of the final hidden state on 8 training conversations (initial rewards ~N(0, 1))."},
    )


class Reward(Method):
    name = "reward"
    title = "reward modelling (Bradley-Terry)"
    help = "Bradley-Terry reward modelling on preference pairs (TRL RewardTrainer)"
    about = ("Bradley-Terry reward modelling: a Gemma sequence-classification model (one output, read at the last "
             "token) trained on preference pairs (chosen vs rejected answers) rendered in the family's chat format.")
    data_format = "preference"
    head = "sequence-classification"
    # A reward model starts from a causal LM (a fresh score head) or from another reward model.
    model_role = "reward model's initial model"
    model_heads = HEADS  # a reward model may start from a causal LM or another reward model
    trainer_config = "trl:RewardConfig"
    arguments = RewardArguments
    refused_keys = {
        "activation_offloading": "not supported by gemma_hf's reward runs.",
    }
    eval_on_start = False  # the held-out pass before training is our own (exact accuracy, margin, loss)
    drop_long_eval = True

    def check(self, c) -> None:
        t, args = c.recipe.training, c.recipe.method_args
        if t.center_rewards_coefficient is not None:
            c.in_range("center_rewards_coefficient", t.center_rewards_coefficient, t.center_rewards_coefficient >= 0,
                       "0 or more (null: off; ~0.01 in TRL's documentation)")
        if args.score_init_std is not None:
            c.in_range("score_init_std", args.score_init_std, args.score_init_std > 0, "a positive number (or null)")
        if c.recipe.gemma.lora_trainable_tokens:
            c.note("lora_trainable_tokens in a reward run trains those embedding rows too")

    def prepare(self, run, dataset, split: str):
        tokenizer, family = run.tokenizer, run.family

        def encode(record):
            out = {"chosen_ids": encode_conversation(tokenizer, record["prompt"] + record["chosen"], family),
                   "rejected_ids": encode_conversation(tokenizer, record["prompt"] + record["rejected"], family)}
            if "margin" in record:
                out["margin"] = float(record["margin"])
            return out

        run.info["margin_column"] = "margin" in dataset.column_names
        tokenized = run.map(dataset, encode, f"Tokenizing {split} pairs ({family} chat format)")
        lengths = [max(len(c), len(r)) for c, r in zip(tokenized["chosen_ids"], tokenized["rejected_ids"])]

        def truncate(ds, max_length):
            cut = run.map(ds, lambda r: {"chosen_ids": r["chosen_ids"][:max_length],
                                         "rejected_ids": r["rejected_ids"][:max_length]}, f"Truncating {split} pairs",
                          remove_columns=False)
            # A pair whose answers differ only after max_length says nothing once cut: drop it.
            return cut.filter(lambda r: r["chosen_ids"] != r["rejected_ids"], desc="Dropping pairs made equal")

        return run.apply_long_examples(tokenized, split, lengths, truncate)

    def configure_model(self, run, model) -> None:
        import torch

        if run.recipe.model_path is not None and "score.weight" not in run.new_parameters:
            run.info["score_head"] = "from the checkpoint"
            return
        std = run.recipe.method_args.score_init_std
        how = "score_init_std"
        if std is None:
            rms = _hidden_rms(model, run.train_set, run.tokenizer.pad_token_id)
            std = 1.0 / (rms * math.sqrt(model.config.hidden_size + 1))
            how = f"1/(rms*sqrt(d+1)), rms {rms:.3g} of the final hidden state on 8 training conversations"
        generator = torch.Generator().manual_seed(run.recipe.training.seed)
        with torch.no_grad():
            weight = model.score.weight
            weight.copy_(torch.randn(weight.shape, generator=generator, dtype=torch.float32).mul_(std).to(weight.dtype))
        run.info["score_head"] = f"new, N(0, {std:.4g}^2): {how}"

    def evaluate(self, run, model, eval_set, when: str) -> dict:
        rewards = score_pairs(model, eval_set, run.tokenizer.pad_token_id, run.recipe.training.per_device_eval_batch_size,
                              run.state.device)
        return pair_metrics(rewards["chosen"], rewards["rejected"], rewards.get("margin")) | {"_rewards": rewards}

    def make_trainer(self, run, model, train_set, eval_set):
        from trl import RewardTrainer

        return RewardTrainer(**run.trainer_kwargs(model, train_set, eval_set))

    def plots(self, run, results: dict, directory) -> list[str]:
        panels = []
        for when in ("before", "after"):
            rewards = (results.get(when) or {}).get("_rewards")
            if rewards:
                accuracy = (results[when] or {}).get("accuracy")
                panels.append((f"{when} training (accuracy {accuracy:.1%})",
                               {"chosen": rewards["chosen"], "rejected": rewards["rejected"]}))
        if not panels:
            return []
        plot_histograms(panels, directory / "reward_histogram.png", "Held-out rewards: chosen vs rejected", "reward")
        return ["reward_histogram.png"]

    def run_info(self, run) -> dict:
        t = run.recipe.training
        return {"score_head": run.info.get("score_head"),
                "margin_column": run.info.get("margin_column", False),
                "center_rewards_coefficient": t.center_rewards_coefficient}

    def summary(self, results: dict) -> list[str]:
        lines = []
        for name, label, fmt in (("accuracy", "held-out pairwise accuracy", "{:.1%}"),
                                 ("margin", "held-out mean margin", "{:+.3f}")):
            before, after = results.get(f"{name}_before"), results.get(f"{name}_after")
            if before is not None or after is not None:
                show = lambda v: "-" if v is None else fmt.format(v)  # noqa: E731
                lines.append(f"{label}: {show(before)} -> {show(after)}")
        return lines


def _hidden_rms(model, dataset, pad_token_id: int, count: int = 8) -> float:
    """RMS of the final hidden state (the score head's input) over the real tokens of a few chosen
    conversations: the scale that makes a new head's initial rewards unit-variance."""
    import torch

    rows = [dataset[i]["chosen_ids"] for i in range(min(count, len(dataset)))]
    total = squares = 0.0
    with torch.no_grad():
        for ids in rows:
            hidden = model.model(input_ids=torch.tensor([ids], device=model.device), use_cache=False).last_hidden_state
            squares += hidden.float().pow(2).mean(dim=-1).sum().item()
            total += hidden.shape[1]
    return math.sqrt(squares / total) if total else 1.0


def score_pairs(model, dataset, pad_token_id: int, batch_size: int, device) -> dict[str, list[float]]:
    """Rewards of every pair of a tokenized preference dataset (chosen_ids / rejected_ids)."""
    import torch
    from trl.trainer.reward_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=pad_token_id)
    was_training = model.training
    model.eval()
    chosen, rejected, margins = [], [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collate([{k: r[k] for k in ("chosen_ids", "rejected_ids")} for r in rows])
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits.float().squeeze(-1)
            half = len(rows)
            chosen += logits[:half].tolist()
            rejected += logits[half:].tolist()
            margins += [float(r.get("margin", 0.0)) for r in rows]
    if was_training:
        model.train()
    out = {"chosen": chosen, "rejected": rejected}
    if "margin" in dataset.column_names:
        out["margin"] = margins
    return out


def pair_metrics(chosen: list[float], rejected: list[float], margins: list[float] | None = None) -> dict:
    """Pairwise accuracy (ties count as wrong, as in TRL), mean margin, Bradley-Terry loss, mean rewards."""
    count = len(chosen)
    if count == 0:
        return {}
    margins = margins or [0.0] * count
    differences = [c - r for c, r in zip(chosen, rejected)]
    loss = sum(_softplus(-(d - m)) for d, m in zip(differences, margins)) / count
    return {
        "accuracy": sum(d > 0 for d in differences) / count,
        "ties": sum(d == 0 for d in differences) / count,
        "margin": sum(differences) / count,
        "loss": loss,
        "reward_chosen_mean": sum(chosen) / count,
        "reward_rejected_mean": sum(rejected) / count,
        "num_pairs": count,
    }


def _softplus(x: float) -> float:
    # -log sigmoid(z) = softplus(-z), computed without overflow
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


METHOD = Reward()
