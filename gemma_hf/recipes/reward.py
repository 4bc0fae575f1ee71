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

Pairs longer than ``max_length`` (``long_examples``): ``drop`` them (training and held-out pairs, as
TRL does), ``truncate`` both conversations at the end (the reward is then read mid-answer), or
``truncate_prompt`` (:func:`fit_pair`): keep both answers whole and cut the *prompt* from the left
-- whole earlier (user, model) turn pairs first, then the oldest tokens of the first remaining user
turn's text -- keeping ``<bos>``, that turn's header ``<start_of_turn>user\n``, its
``<end_of_turn>`` and the model turn's header, so the pair still reads as a chat that ends with the
question's last words. Only when the answers alone do not fit (with a prompt of one text token) is
the prompt cut to a quarter of max_length and the answers cut at the end to fill the rest. run.json
counts the pairs of each kind (``prompt_cut``, ``answers_cut``) and the pairs a cut made equal
(``made_equal``, dropped).

Held-out results (eval.json, before and after training): pairwise accuracy (share of pairs whose
chosen answer gets the higher reward) with its 95% percentile-bootstrap interval over pairs
(``accuracy_ci_low``/``accuracy_ci_high``, gemma_hf.evaluation.winrate.bootstrap_interval, seeded by
the training seed), mean margin ``r_chosen - r_rejected``, the Bradley-Terry loss and the mean
rewards; plots/reward_histogram.png shows the held-out reward distributions of chosen and rejected
answers before and after. ``extra_eval_datasets`` adds held-out sets of another kind, each
evaluated before and after alike and recorded under its own prefix (``NAME_accuracy``, ...): a
preference dataset, or pairs built from instruction data (gemma_hf.evaluation.preference_sets:
``off_topic`` -- the reference answer against another instruction's answer of about the same
length -- or ``shuffled``), built in memory at the start of the run, deterministic and seeded.

Library behaviours relied on (TRL 1.16):
- ``RewardTrainer`` takes a dataset with ``chosen_ids``/``rejected_ids`` (and ``margin``) as
  already tokenized, pads both halves to the right into one batch (chosen first) and splits the
  model's ``logits`` in two; it requires ``config.num_labels == 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gemma_hf.chat import CONTROL_TOKENS, END_OF_TURN, FAMILIES, START_OF_TURN
from gemma_hf.evaluation.preference_sets import BUILDS, preference_pairs
from gemma_hf.tokenization import encode_conversation

from .data import read_dataset
from .methods import HEADS, Method
from .plots import plot_histograms
from .problems import Problem, RecipeError
from .schema import DatasetSpec

BOOTSTRAP_RESAMPLES = 1000  # of the held-out accuracy's 95% interval
EXTRA_EVAL_KEYS = ("name", "path", "split", "format", "columns", "build", "size", "seed")


@dataclass
class RewardArguments:
    long_examples: str = field(
        default="drop",
        metadata={
            "help": "Pairs whose chosen or rejected conversation is longer than max_length: drop them (training and "
            "held-out pairs, as TRL does; the counts go to run.json), truncate both to max_length (keeping the "
            "start: the reward is then read mid-answer), or truncate_prompt: keep both answers whole and cut the "
            "prompt from the left, keeping the turn structure (the answers are cut at the end only when they alone "
            "do not fit).",
            "choices": ["drop", "truncate", "truncate_prompt"],
        },
    )
    extra_eval_datasets: list[dict[str, Any]] | None = field(
        default=None,
        metadata={"help": "Further held-out sets, evaluated before and after training and recorded under their own "
                          "prefix (NAME_accuracy, ...): each {name, path[, split, format, columns]} of preference "
                          "pairs, or {name, path[, split], build: KIND, size, seed} to build pairs from "
                          "instruction data (the reference answer against a corruption of it: off_topic, truncated, "
                          "repeated, echo or shuffled; gemma_hf.evaluation.preference_sets). Never trained on."},
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
        names = set()
        for index, entry in enumerate(args.extra_eval_datasets or []):
            key = f"extra_eval_datasets[{index}]"
            problem = _extra_entry_problem(entry, names)
            if problem:
                c.error(key, *problem)
                continue
            names.add(entry["name"])
            part = _read_extra(entry, index, c.recipe.family)
            for p in part.problems:
                (c.environment if p.environment else c.error)(p.key.replace(f"datasets[{index}]", key, 1), p.message,
                                                               p.fix)

    def prepare(self, run, dataset, split: str):
        import datasets

        tokenizer, family = run.tokenizer, run.family
        policy = run.recipe.method_args.long_examples

        def encode(record):
            out = {"chosen_ids": encode_conversation(tokenizer, record["prompt"] + record["chosen"], family),
                   "rejected_ids": encode_conversation(tokenizer, record["prompt"] + record["rejected"], family)}
            if "margin" in record:
                out["margin"] = float(record["margin"])
            if record.get("origin"):  # kept for the held-out accuracy by origin; the collator ignores it
                out["origin"] = record["origin"]
            return out

        if split != "extra":
            run.info["margin_column"] = "margin" in dataset.column_names
        tokenized = run.map(dataset, encode, f"Tokenizing {split} pairs ({family} chat format)")
        lengths = [max(len(c), len(r)) for c, r in zip(tokenized["chosen_ids"], tokenized["rejected_ids"])]
        counts = {"prompt_cut": 0, "answers_cut": 0, "made_equal": 0}

        def truncate(ds, max_length):
            if policy == "truncate_prompt":
                fit = PairFitter(tokenizer)
                rows = [fit(c, r, max_length) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"])]
                for _, _, how in rows:
                    if how:
                        counts[how] += 1
                cut = datasets.Dataset.from_dict({**{name: ds[name] for name in ds.column_names},
                                                  "chosen_ids": [c for c, _, _ in rows],
                                                  "rejected_ids": [r for _, r, _ in rows]})
            else:
                cut = run.map(ds, lambda r: {"chosen_ids": r["chosen_ids"][:max_length],
                                             "rejected_ids": r["rejected_ids"][:max_length]}, f"Truncating {split} pairs",
                              remove_columns=False)
            # A pair whose answers differ only after max_length says nothing once cut: drop it.
            kept = cut.filter(lambda r: r["chosen_ids"] != r["rejected_ids"], desc="Dropping pairs made equal")
            counts["made_equal"] = len(cut) - len(kept)
            return kept

        prepared, stats = run.apply_long_examples(tokenized, split, lengths, truncate)
        if stats.get("handling") == "truncate":
            stats.update(handling=policy, **(counts if policy == "truncate_prompt" else {"made_equal": counts["made_equal"]}))
        return prepared, stats

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
        t = run.recipe.training
        rewards = score_pairs(model, eval_set, run.tokenizer.pad_token_id, t.per_device_eval_batch_size,
                              run.state.device)
        out = pair_metrics(rewards["chosen"], rewards["rejected"], rewards.get("margin"), seed=t.seed)
        out["_rewards"] = rewards
        out.update(origin_metrics(eval_set, rewards, t.seed))
        for name, pairs in _extra_sets(run).items():
            scored = score_pairs(model, pairs, run.tokenizer.pad_token_id, t.per_device_eval_batch_size,
                                 run.state.device)
            out.update({f"{name}_{k}": v for k, v in pair_metrics(scored["chosen"], scored["rejected"],
                                                                   seed=t.seed).items()})
        return out

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
        def show(when, name, fmt):
            value = results.get(f"{name}_{when}")
            if value is None:
                return "-"
            low, high = results.get(f"{name}_ci_low_{when}"), results.get(f"{name}_ci_high_{when}")
            return fmt.format(value) + (f" [{low:.1%}, {high:.1%}]" if low is not None and high is not None else "")

        names = [("accuracy", "held-out pairwise accuracy", "{:.1%}"), ("margin", "held-out mean margin", "{:+.3f}")]
        def label(stem):
            if stem.startswith("origin_"):
                return f"  held-out pairs from {stem[len('origin_'):]}: accuracy"
            return f"{stem} pairwise accuracy"

        names += [(key[: -len("_accuracy_after")] + "_accuracy", label(key[: -len("_accuracy_after")]), "{:.1%}")
                  for key in results if key.endswith("_accuracy_after") and key != "accuracy_after" and "_ci_" not in key]
        return [f"{label}: {show('before', name, fmt)} -> {show('after', name, fmt)}" for name, label, fmt in names
                if results.get(f"{name}_before") is not None or results.get(f"{name}_after") is not None]


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


def pair_metrics(chosen: list[float], rejected: list[float], margins: list[float] | None = None, *,
                 seed: int = 0, num_resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Pairwise accuracy (ties count as wrong, as in TRL) with its 95% percentile-bootstrap interval over
    pairs, mean margin, Bradley-Terry loss, mean rewards."""
    from gemma_hf.evaluation.winrate import bootstrap_interval

    count = len(chosen)
    if count == 0:
        return {}
    margins = margins or [0.0] * count
    differences = [c - r for c, r in zip(chosen, rejected)]
    loss = sum(_softplus(-(d - m)) for d, m in zip(differences, margins)) / count
    correct = [float(d > 0) for d in differences]
    low, high = bootstrap_interval(correct, num_resamples, seed=seed)
    return {
        "accuracy": sum(correct) / count,
        "accuracy_ci_low": low,
        "accuracy_ci_high": high,
        "ties": sum(d == 0 for d in differences) / count,
        "margin": sum(differences) / count,
        "loss": loss,
        "reward_chosen_mean": sum(chosen) / count,
        "reward_rejected_mean": sum(rejected) / count,
        "num_pairs": count,
    }


def origin_metrics(eval_set, rewards: dict, seed: int) -> dict:
    """Held-out accuracy (with its interval) of each origin of a mixture of two or more -- a dataset by its
    file's stem, a built pair by its kind -- as ``origin_NAME_accuracy``, ...: so that a mixture's accuracy
    is never read as one number where one origin is easy and another at chance."""
    if "origin" not in getattr(eval_set, "column_names", ()):
        return {}
    origins = eval_set["origin"]
    names = sorted({o for o in origins if o})
    if len(names) < 2:
        return {}
    out = {}
    for name in names:
        rows = [i for i, o in enumerate(origins) if o == name]
        metrics = pair_metrics([rewards["chosen"][i] for i in rows], [rewards["rejected"][i] for i in rows], seed=seed)
        out.update({f"origin_{name}_{k}": metrics[k] for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high",
                                                                "margin", "num_pairs")})
    return out


def _softplus(x: float) -> float:
    # -log sigmoid(z) = softplus(-z), computed without overflow
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


class PairFitter:
    """``long_examples: truncate_prompt`` for one tokenizer: ``fitter(chosen_ids, rejected_ids, max_length)``
    is :func:`fit_pair` with the tokenizer's turn tokens."""

    def __init__(self, tokenizer):
        self.start_of_turn, self.end_of_turn = tokenizer.convert_tokens_to_ids([START_OF_TURN, END_OF_TURN])
        self.user_header = tokenizer(f"{START_OF_TURN}user\n", add_special_tokens=False)["input_ids"]

    def __call__(self, chosen: list[int], rejected: list[int], max_length: int):
        return fit_pair(chosen, rejected, max_length, self.start_of_turn, self.end_of_turn, self.user_header)


def fit_pair(chosen: list[int], rejected: list[int], max_length: int, start_of_turn: int, end_of_turn: int,
             user_header: list[int]) -> tuple[list[int], list[int], str | None]:
    """(chosen, rejected, how) of a tokenized pair fitted into ``max_length`` tokens, ``how`` None
    (it fits), "prompt_cut" or "answers_cut".

    The prompt is the pair's shared beginning up to the last ``<start_of_turn>`` in it (the header of
    the answering model turn); the answers are the rest. If both answers fit with a prompt of at least
    one text token, the answers stay whole and the prompt is cut from the left (:func:`_cut_prompt`);
    otherwise the prompt is cut to a quarter of ``max_length`` (at least that minimal prompt) and each
    answer is cut at its end to fill the rest."""
    if max(len(chosen), len(rejected)) <= max_length:
        return chosen, rejected, None
    shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    starts = [i for i in range(shared) if chosen[i] == start_of_turn]
    if not starts:  # no turn structure to keep (not a chat): cut at the end
        return chosen[:max_length], rejected[:max_length], "answers_cut"
    prompt, answers = chosen[:starts[-1]], (chosen[starts[-1]:], rejected[starts[-1]:])
    longest = max(map(len, answers))
    cut = _cut_prompt(prompt, max_length - longest, start_of_turn, end_of_turn, user_header)
    if cut is not None:
        return cut + answers[0], cut + answers[1], "prompt_cut"
    cut = _cut_prompt(prompt, max(max_length // 4, _minimal_prompt(prompt, start_of_turn, end_of_turn, user_header)),
                      start_of_turn, end_of_turn, user_header)
    if cut is None or len(cut) >= max_length:
        return chosen[:max_length], rejected[:max_length], "answers_cut"
    room = max_length - len(cut)
    return cut + answers[0][:room], cut + answers[1][:room], "answers_cut"


def _prompt_turns(prompt: list[int], start_of_turn: int) -> list[list[int]]:
    """The turns of a prompt (``<bos>`` first, then ``<start_of_turn>...`` each)."""
    starts = [i for i, token in enumerate(prompt) if token == start_of_turn and i > 0]
    return [prompt[a:b] for a, b in zip(starts, starts[1:] + [len(prompt)])]


def _minimal_prompt(prompt: list[int], start_of_turn: int, end_of_turn: int, user_header: list[int]) -> int:
    """Length of the shortest prompt :func:`_cut_prompt` can make: <bos>, the last user turn's header,
    one token of its text and its end."""
    last = _prompt_turns(prompt, start_of_turn)[-1]
    end = len(last) - max(i for i, token in enumerate(last) if token == end_of_turn)
    return 1 + len(user_header) + 1 + end


def _cut_prompt(prompt: list[int], budget: int, start_of_turn: int, end_of_turn: int,
                user_header: list[int]) -> list[int] | None:
    """``prompt`` in at most ``budget`` tokens, cut from the left, or None if even one text token of the
    last user turn does not fit. Whole (user, model) turn pairs go first (so the turns still alternate
    from a user turn); then the oldest tokens of the first remaining user turn's text, keeping
    ``<bos>``, its header (``user_header``: ``<start_of_turn>user\n``) and its ``<end_of_turn>`` with
    what follows it."""
    if len(prompt) <= budget:
        return prompt
    bos, turns = prompt[:1], _prompt_turns(prompt, start_of_turn)
    if sum(map(len, turns)) + 1 != len(prompt):
        raise RuntimeError("a prompt's tokens do not start with <bos><start_of_turn>")
    while len(turns) > 1 and 1 + sum(map(len, turns)) > budget:
        turns = turns[2:]
    rest = [token for turn in turns[1:] for token in turn]
    if 1 + len(turns[0]) + len(rest) <= budget:
        return bos + turns[0] + rest
    first = turns[0]
    if first[:len(user_header)] != user_header:
        raise RuntimeError(f"a prompt's user turn does not start with the tokens of {START_OF_TURN}user\\n")
    end = max(i for i, token in enumerate(first) if token == end_of_turn)
    text = first[len(user_header):end]
    room = budget - 1 - len(user_header) - (len(first) - end) - len(rest)
    if room < 1 or not text:
        return None
    return bos + user_header + text[-room:] + first[end:] + rest


def _extra_entry_problem(entry, names: set) -> tuple[str, str] | None:
    """(message, fix) of an ``extra_eval_datasets`` entry that is not well formed, or None."""
    example = "{name: off_topic, path: asset:llamafactory-data/alpaca_en_demo.json, build: off_topic, size: 100}"
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("name"), str):
        return "each entry needs a name and a path", f"write e.g. {example}"
    unknown = sorted(set(entry) - set(EXTRA_EVAL_KEYS))
    if unknown:
        return f"unknown keys {unknown}", f"use only {', '.join(EXTRA_EVAL_KEYS)}"
    name = entry["name"]
    if not name.isidentifier() or not name.islower() or name in names:
        return (f"name {name!r} must be a new lower-case identifier (it prefixes the results in eval.json)",
                "use e.g. off_topic, and each name once")
    if "build" in entry and entry["build"] not in BUILDS:
        return f"build {entry['build']!r} is not one of {list(BUILDS)}", f"set build to one of {', '.join(BUILDS)}, or remove it"
    for key in ("size", "seed"):
        if key in entry and "build" not in entry:
            return f"{key} applies to built sets only", "add build: off_topic (or shuffled), or remove it"
        if key in entry and not (isinstance(entry[key], int) and not isinstance(entry[key], bool)
                                 and entry[key] >= (2 if key == "size" else 0)):
            return f"{key} {entry[key]!r} is out of range", f"set {key} to an integer {'>= 2' if key == 'size' else '>= 0'}"
    return None


def _read_extra(entry: dict, index: int, family: str):
    """The records of an ``extra_eval_datasets`` entry: preference pairs, or instruction records to
    build them from (read and checked as the mixture's datasets are)."""


    spec = DatasetSpec(path=entry["path"], split=entry.get("split", "train"), columns=entry.get("columns"),
                       format=entry.get("format", "auto"))
    return read_dataset(spec, index, "conversation" if "build" in entry else "preference",
                        family if family in FAMILIES else "gemma2", CONTROL_TOKENS)


def extra_pairs(entry: dict, records: list[dict]) -> list[dict]:
    """The preference pairs of an ``extra_eval_datasets`` entry from its records (built if it says so)."""
    if "build" not in entry:
        return records
    return preference_pairs(records, entry["build"], entry.get("size", 100), entry.get("seed", 0))


def _extra_sets(run) -> dict:
    """The tokenized ``extra_eval_datasets`` of a run by name, prepared once (long pairs as the recipe
    says; their counts go to run.json under ``extra:NAME``)."""
    import datasets


    prepared = run.info.get("_extra_eval_sets")
    if prepared is not None:
        return prepared
    prepared = {}
    for index, entry in enumerate(run.recipe.method_args.extra_eval_datasets or []):
        part = _read_extra(entry, index, run.family)
        if part.problems:
            raise RecipeError(run.recipe.source, [Problem(p.key, p.message, p.fix, run.recipe.origin("extra_eval_datasets"))
                                                  for p in part.problems])
        pairs = extra_pairs(entry, part.records)
        for pair in pairs:
            pair.pop("margin", None)
        pairs, run.stats[f"extra:{entry['name']}"] = run.method.prepare(run, datasets.Dataset.from_list(pairs), "extra")
        prepared[entry["name"]] = pairs
    run.info["_extra_eval_sets"] = prepared
    return prepared


METHOD = Reward()
