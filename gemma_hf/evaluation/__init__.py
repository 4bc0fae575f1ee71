"""Evaluation of post-trained models against a baseline on held-out prompts.

One job per file:

=================  ==========================================================================
prompts.py         held-out items -> prompt, reference answer, the plain texts judges read
generation.py      batched greedy answers (left padding, = one-by-one), stop at <end_of_turn>
metrics.py         held-out loss / perplexity; chat-format health (ended turns, empty, repeats,
                   distinct-2)
winrate.py         win / tie / loss, win rate (ties 0.5), seeded bootstrap interval
rewards.py         reward-model scorer and reward win rate
judge.py           side-by-side in both orders; the LM judge (next-token P("A") vs P("B"))
templates/         the judge prompt template (judge_side_by_side.txt)
compare.py         evaluate(): everything above in one JSON-able dict; markdown_table()
harness.py         optional lm-evaluation-harness runs (run_lm_eval)
=================  ==========================================================================

Typical use::

    from gemma_hf.evaluation import Contestant, LMJudge, RewardModelScorer, evaluate, markdown_table

    result = evaluate(Contestant.from_pretrained("runs/sft", "sft"), heldout,
                      Contestant.from_pretrained("runs/base", "base"),
                      reward=RewardModelScorer.from_pretrained("runs/reward"),
                      judge=LMJudge.from_pretrained("runs/judge"))
    Path("eval.json").write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
"""

from .compare import DEFINITIONS, Contestant, evaluate, markdown_table
from .generation import Answer, generate_answers
from .harness import LMEvalUnavailable, markdown_lm_eval, run_lm_eval
from .judge import LMJudge, fill_template, load_template, read_verdict, side_by_side, template_path
from .metrics import chat_health, distinct_n, heldout_loss, repeats_prompt
from .prompts import HeldOut, held_out, held_out_items, plain_text, prompt_text
from .rewards import RewardModelScorer, mean_reward, reward_win_rate
from .winrate import bootstrap_interval, combine_preferences, format_win_rate, outcome_of_scores, win_rate

__all__ = [
    "Answer",
    "Contestant",
    "DEFINITIONS",
    "HeldOut",
    "LMEvalUnavailable",
    "LMJudge",
    "RewardModelScorer",
    "bootstrap_interval",
    "chat_health",
    "combine_preferences",
    "distinct_n",
    "evaluate",
    "fill_template",
    "format_win_rate",
    "generate_answers",
    "held_out",
    "held_out_items",
    "heldout_loss",
    "load_template",
    "markdown_table",
    "mean_reward",
    "outcome_of_scores",
    "plain_text",
    "prompt_text",
    "read_verdict",
    "repeats_prompt",
    "reward_win_rate",
    "run_lm_eval",
    "markdown_lm_eval",
    "side_by_side",
    "template_path",
    "win_rate",
]
