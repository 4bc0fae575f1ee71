"""Side-by-side evaluation with a judge, in both orders, as report 1 (Table 5) presents it.

A judge is any callable ``judge(instruction, answer_a, answer_b)`` that returns

* a verdict: ``"A"``, ``"B"`` or ``"tie"``; or
* probabilities: a mapping with keys ``"A"``, ``"B"`` and optionally ``"tie"`` (other keys are
  ignored); the verdict is the most probable of them, and an exact tie between the top two is
  ``"tie"``.

A judge may also offer ``judge_batch(items) -> list`` (``items``: (instruction, answer_a,
answer_b) tuples); :func:`side_by_side` then hands it every comparison at once.

Both orders. Every prompt is judged twice, the model's answer first as A, then as B, and the two
verdicts combine into one win, tie or loss (:func:`gemma_hf.evaluation.winrate.combine_preferences`):
a judge that always picks the same position gives exactly 0.5, whatever the answers. The win rate
(ties 0.5) comes with its seeded bootstrap interval and the win / tie / loss shares. Also reported:
``position_consistency`` (share of prompts whose two verdicts agree on a contestant) and
``first_position_rate`` (share of all verdicts that chose A): how much position drives the judge.

The LM judge (:class:`LMJudge`) asks a causal LM (a GemmaHFForCausalLM run directory, the Gemma 3
270M, ...) with the prompt template ``templates/judge_side_by_side.txt`` (kept in the repository,
filled with ``{instruction}``, ``{answer_a}``, ``{answer_b}``), rendered as one user turn in the
judge's chat format with the generation prompt. It does not generate: it reads the judge's
next-token distribution at the start of its turn and compares the probabilities of the tokens
``A`` and ``B`` (and of a tie letter when ``tie_choice`` is set, for a template that offers one).
Why: parsing free text fails on weak judges (a 270M model rarely writes a clean verdict), needs
rules for hedged answers, and depends on sampling; the two probabilities always exist, are
deterministic (one forward pass, no sampling), and still carry a preference when the judge puts
most of its mass elsewhere (that mass is reported per prompt as ``mass``: the raw probability of
the choice letters). The default template is a forced choice (A or B); ties then come from the two
orders disagreeing.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from gemma_hf.progress import batch_starts

from .prompts import answer_text, held_out, plain_text
from .winrate import BASELINE, MODEL, TIE, combine_preferences, win_rate

DEFAULT_TEMPLATE = "judge_side_by_side.txt"
TEMPLATE_FIELDS = frozenset({"instruction", "answer_a", "answer_b"})
VERDICTS = ("A", "B", "tie")

Judge = Callable[[str, str, str], "str | Mapping[str, float]"]


# --------------------------------------------------------------------------------------------
# the template
# --------------------------------------------------------------------------------------------


def template_path(name: str = DEFAULT_TEMPLATE) -> Path:
    """Path of a template shipped in gemma_hf/evaluation/templates/."""
    return Path(str(resources.files("gemma_hf.evaluation") / "templates" / name))


def load_template(template: str | Path | None = None) -> str:
    """The judge template: the shipped one (None), a file path, or the template text itself.

    A template is text with exactly the fields ``{instruction}``, ``{answer_a}`` and ``{answer_b}``
    (Python ``str.format`` syntax; write a literal brace as ``{{`` or ``}}``).
    """
    if template is None:
        path = template_path()
        if not path.is_file():
            raise FileNotFoundError(f"the judge template {path} is missing from the installed package (package data "
                                    "gemma_hf/evaluation/templates/*.txt)")
        text = path.read_text(encoding="utf-8")
    elif isinstance(template, Path) or "{" not in template:  # a path (template text always has fields)
        path = Path(template)
        if not path.is_file():
            raise FileNotFoundError(f"judge template file {path} not found")
        text = path.read_text(encoding="utf-8")
    else:
        text = str(template)
    check_template(text)
    return text


def check_template(text: str) -> None:
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as err:
        raise ValueError(f"the judge template is not valid str.format text: {err} "
                         "(write literal braces doubled: {{ and }})") from None
    if fields != TEMPLATE_FIELDS:
        missing, unknown = sorted(TEMPLATE_FIELDS - fields), sorted(fields - TEMPLATE_FIELDS)
        raise ValueError(f"the judge template needs exactly the fields {sorted(TEMPLATE_FIELDS)}"
                         + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))


def fill_template(template: str, instruction: str, answer_a: str, answer_b: str) -> str:
    """The template with its fields filled (values are inserted verbatim, braces in them included)."""
    return template.format_map({"instruction": instruction, "answer_a": answer_a, "answer_b": answer_b})


# --------------------------------------------------------------------------------------------
# reading a verdict
# --------------------------------------------------------------------------------------------


def read_verdict(result) -> tuple[str, dict | None]:
    """(``"A"`` | ``"B"`` | ``"tie"``, the probabilities or None) from what a judge returned."""
    if isinstance(result, str):
        verdict = {"a": "A", "b": "B", "tie": "tie"}.get(result.strip().lower())
        if verdict is None:
            raise ValueError(f"a judge returned {result!r}; expected 'A', 'B' or 'tie'")
        return verdict, None
    if isinstance(result, Mapping):
        probabilities = {k: float(result[k]) for k in VERDICTS if k in result}
        if "A" not in probabilities or "B" not in probabilities:
            raise ValueError(f"a judge's probabilities need keys 'A' and 'B', got {sorted(result)}")
        ranked = sorted(probabilities.items(), key=lambda kv: kv[1], reverse=True)
        verdict = "tie" if ranked[0][1] == ranked[1][1] else ranked[0][0]
        details = {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
        return verdict, details
    raise TypeError(f"a judge returned a {type(result).__name__}; "
                    "expected 'A', 'B', 'tie' or a mapping of probabilities")


def _preference(verdict: str, model_is_a: bool) -> str:
    """A positional verdict as a preference between the contestants."""
    if verdict == "tie":
        return TIE
    return MODEL if (verdict == "A") == model_is_a else BASELINE


# --------------------------------------------------------------------------------------------
# side by side
# --------------------------------------------------------------------------------------------


def side_by_side(judge: Judge, prompts: Sequence, model_answers: Sequence, baseline_answers: Sequence, *,
                 num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Judge the model's answers against the baseline's, both orders per prompt.

    ``prompts``: held-out items (the judge sees :func:`gemma_hf.evaluation.prompts.prompt_text` of
    their prompt); answers: strings or Answer objects (shown as plain text, control tokens removed).

    Returns :func:`~gemma_hf.evaluation.winrate.win_rate`'s keys (``win_rate``, ``ci_low``,
    ``ci_high``, ``wins``, ``ties``, ``losses``, ``num_prompts``), ``position_consistency``,
    ``first_position_rate`` and ``per_prompt``: one ``{"model_first", "model_second", "outcome"}``
    per prompt (the positional verdicts with the model as A, then as B), plus
    ``"probabilities_model_first"`` / ``"probabilities_model_second"`` for a judge that returns them.
    """
    if not len(prompts) == len(model_answers) == len(baseline_answers):
        raise ValueError(f"{len(prompts)} prompts, {len(model_answers)} model answers and "
                         f"{len(baseline_answers)} baseline answers: one of each per prompt")
    instructions = [held_out(p).instruction for p in prompts]
    ours = [plain_text(answer_text(a)) for a in model_answers]
    theirs = [plain_text(answer_text(a)) for a in baseline_answers]
    count = len(instructions)
    items = ([(i, m, b) for i, m, b in zip(instructions, ours, theirs)]
             + [(i, b, m) for i, m, b in zip(instructions, ours, theirs)])
    batch = getattr(judge, "judge_batch", None)
    results = list(batch(items)) if callable(batch) else [judge(*item) for item in items]
    if len(results) != len(items):
        raise ValueError(f"the judge returned {len(results)} verdicts for {len(items)} comparisons")
    verdicts = [read_verdict(r) for r in results]

    outcomes, per_prompt, consistent = [], [], 0
    for index in range(count):
        (first, first_p), (second, second_p) = verdicts[index], verdicts[count + index]
        a, b = _preference(first, model_is_a=True), _preference(second, model_is_a=False)
        outcome = combine_preferences(a, b)
        outcomes.append(outcome)
        consistent += a == b
        row = {"model_first": first, "model_second": second, "outcome": outcome}
        if first_p is not None or second_p is not None:
            row["probabilities_model_first"] = first_p
            row["probabilities_model_second"] = second_p
        per_prompt.append(row)
    result = win_rate(outcomes, num_resamples, confidence, seed)
    result["position_consistency"] = consistent / count if count else None
    result["first_position_rate"] = sum(v == "A" for v, _ in verdicts) / len(verdicts) if verdicts else None
    result["per_prompt"] = per_prompt
    return result


# --------------------------------------------------------------------------------------------
# the LM judge
# --------------------------------------------------------------------------------------------


class LMJudge:
    """A causal LM as judge: P(next token = "A") vs P("B") after the filled template (see the module doc).

    ``family``: the chat format the judge prompt is rendered in. ``choices``: the letters for
    "A is better" and "B is better", each must be one token. ``tie_choice``: a letter meaning "tie"
    (only for a template that offers one; the shipped template does not). Returns, per comparison,
    ``{"A": p, "B": p[, "tie": p], "mass": m}``: probabilities renormalised over the choice letters,
    and their raw total probability ``m``.
    """

    def __init__(self, model, tokenizer, family: str, template: str | Path | None = None, *,
                 choices: tuple[str, str] = ("A", "B"), tie_choice: str | None = None, batch_size: int = 8,
                 name: str | None = None):
        from gemma_hf.chat import chat_format

        chat_format(family)  # refuses an unknown family
        self.model = model
        self.tokenizer = tokenizer
        self.family = family
        self.template = load_template(template)
        self.batch_size = batch_size
        self.name = name or getattr(model, "name_or_path", None) or type(model).__name__
        labels = {"A": choices[0], "B": choices[1]}
        if tie_choice is not None:
            labels["tie"] = tie_choice
        self.choice_ids = {verdict: self._single_token(letter) for verdict, letter in labels.items()}
        if len(set(self.choice_ids.values())) != len(self.choice_ids):
            raise ValueError(f"the choice letters {labels} must be distinct tokens")

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str = "float32", tokenizer_dir: str | Path | None = None,
                        device=None, **kwargs) -> LMJudge:
        """A judge from a Gemma causal-LM directory (a run directory, the 270M asset, ...)."""
        from gemma_hf.sampling import load_chat_model

        model, tokenizer, family = load_chat_model(model_dir, dtype=dtype, tokenizer_dir=tokenizer_dir, role="judge")
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, family, name=kwargs.pop("name", str(model_dir)), **kwargs)

    def _single_token(self, letter: str) -> int:
        ids = self.tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"the judge's choice {letter!r} is {len(ids)} tokens for this tokenizer; it must be one")
        return ids[0]

    def prompt(self, instruction: str, answer_a: str, answer_b: str) -> str:
        """The judge's user turn: the template filled in."""
        return fill_template(self.template, instruction, answer_a, answer_b)

    def encode(self, instruction: str, answer_a: str, answer_b: str) -> list[int]:
        """Token ids the judge reads: the user turn in its chat format, then ``<start_of_turn>model\\n``."""
        from gemma_hf.chat import encode_chat

        messages = [{"role": "user", "content": self.prompt(instruction, answer_a, answer_b)}]
        return encode_chat(self.tokenizer, messages, self.family, add_generation_prompt=True)

    def __call__(self, instruction: str, answer_a: str, answer_b: str) -> dict:
        return self.judge_batch([(instruction, answer_a, answer_b)])[0]

    def judge_batch(self, items: Sequence[tuple[str, str, str]]) -> list[dict]:
        import torch

        encoded = [self.encode(*item) for item in items]
        context = getattr(self.model.config, "max_position_embeddings", None)
        for index, ids in enumerate(encoded):
            if context is not None and len(ids) > context:
                raise ValueError(f"judge prompt {index} is {len(ids)} tokens and the judge's context holds {context}: "
                                 "use a judge with a longer context, or shorter answers (max_new_tokens)")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        verdict_keys = list(self.choice_ids)
        out: list[dict] = []
        was_training = self.model.training
        self.model.eval()
        device = self.model.device
        try:
            with torch.no_grad():
                ids_tensor = torch.tensor([self.choice_ids[k] for k in verdict_keys], device=device)
                for start in batch_starts(len(encoded), self.batch_size, "judging (both orders)",
                                          unit="judgements"):
                    rows = encoded[start:start + self.batch_size]
                    width = max(len(r) for r in rows)
                    # Left padding: every row's last token sits in the last column.
                    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
                    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                    logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
                    chosen = torch.log_softmax(logits, dim=-1)[:, ids_tensor].exp()
                    for row in chosen.tolist():
                        mass = sum(row)
                        probabilities = {k: (p / mass if mass > 0 else 1.0 / len(row))
                                         for k, p in zip(verdict_keys, row)}
                        out.append({**probabilities, "mass": mass})
        finally:
            if was_training:
                self.model.train()
        return out


__all__ = ["DEFAULT_TEMPLATE", "TEMPLATE_FIELDS", "VERDICTS", "Judge", "template_path", "load_template",
           "check_template", "fill_template", "read_verdict", "side_by_side", "LMJudge"]
