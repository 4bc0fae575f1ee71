"""Win rates over prompts, as report 1 (Gemma, Table 5) presents side-by-side evaluations.

Each prompt ends as a win, a tie or a loss for the model against the baseline; a win scores 1, a tie
0.5 ("we break ties evenly"), a loss 0. The win rate is the mean score over prompts, reported with
its 95% confidence interval and the shares of wins / ties / losses::

    61.2%   [59.3%, 63.0%]   52.2% / 18.1% / 29.8%

The interval is a percentile bootstrap over prompts: ``num_resamples`` (1000) times, draw as many
prompts as there are, with replacement, from a NumPy generator seeded with ``seed``, and take the
mean score of each draw; the interval is the (1 - confidence)/2 and (1 + confidence)/2 quantiles of
those means (NumPy's default, linear interpolation). Same scores + same seed = same interval. The
prompts drawn depend only on (number of prompts, ``num_resamples``, ``seed``): intervals of several
models' scores on the same prompts, with the same seed, come from the same draws -- they are
paired, and the interval of per-prompt differences is that of the difference of the means.
With ``weights`` (one per prompt) each draw's statistic is the weighted mean instead, sum(w x) /
sum(w): a ratio such as a per-token mean over prompts of different lengths (tokens as weights).

Two verdicts on one prompt (the judge asked in both orders) combine by summing their points
(model preferred 1, tie 0.5, baseline preferred 0): above 1 is a win, 1 a tie, below 1 a loss. So
two agreeing verdicts decide; a verdict and a tie lean to the verdict; two opposite verdicts (the
judge picked the same *position* twice: position bias) are a tie.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WIN, TIE, LOSS = "win", "tie", "loss"
OUTCOMES = (WIN, TIE, LOSS)
POINTS = {WIN: 1.0, TIE: 0.5, LOSS: 0.0}

# One judge verdict, in terms of the contestants rather than positions.
MODEL, BASELINE = "model", "baseline"
PREFERENCE_POINTS = {MODEL: 1.0, TIE: 0.5, BASELINE: 0.0}


def outcome_of_scores(model_score: float, baseline_score: float, tie_tolerance: float = 0.0) -> str:
    """win / tie / loss of the model from two scores (e.g. rewards): a tie within ``tie_tolerance``."""
    difference = model_score - baseline_score
    if abs(difference) <= tie_tolerance:
        return TIE
    return WIN if difference > 0 else LOSS


def combine_preferences(first: str, second: str) -> str:
    """win / tie / loss from two preferences ("model", "baseline" or "tie"), one per order."""
    total = PREFERENCE_POINTS[first] + PREFERENCE_POINTS[second]
    if total > 1.0:
        return WIN
    if total < 1.0:
        return LOSS
    return TIE


def bootstrap_interval(scores: Sequence[float], num_resamples: int = 1000, confidence: float = 0.95,
                       seed: int = 0, weights: Sequence[float] | None = None) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``scores`` (one score per prompt), seeded.

    ``weights`` (one per prompt, >= 0): the interval of the weighted mean sum(w x) / sum(w) instead; a
    draw whose weights sum to 0 has no mean and is left out of the quantiles (a prompt of weight 0 may
    hold any score, NaN included)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("bootstrap_interval needs a non-empty list of scores")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be at least 1, got {num_resamples}")
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != values.shape or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
            raise ValueError("bootstrap_interval needs one finite weight >= 0 per score, not all 0")
        values = np.where(w > 0, values, 0.0) * w
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples, dtype=np.float64)
    # Draw in blocks of about 2**22 indices, so a large evaluation does not build one huge matrix.
    block = max(1, (1 << 22) // values.size)
    for start in range(0, num_resamples, block):
        count = min(block, num_resamples - start)
        picks = rng.integers(0, values.size, size=(count, values.size))
        if weights is None:
            means[start:start + count] = values[picks].mean(axis=1)
        else:
            totals = w[picks].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                means[start:start + count] = np.where(totals > 0, values[picks].sum(axis=1) / totals, np.nan)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(means, [alpha, 1.0 - alpha]) if weights is not None else \
        np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def win_rate(outcomes: Sequence[str], num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Win rate (ties count 0.5) with its bootstrap interval and the win / tie / loss shares.

    Keys: ``win_rate``, ``ci_low``, ``ci_high``, ``wins``, ``ties``, ``losses`` (shares of prompts,
    summing to 1), ``num_prompts``. Empty ``outcomes``: the rates are None.
    """
    unknown = sorted({o for o in outcomes if o not in POINTS})
    if unknown:
        raise ValueError(f"unknown outcomes {unknown}; expected {list(OUTCOMES)}")
    count = len(outcomes)
    if count == 0:
        return {"win_rate": None, "ci_low": None, "ci_high": None, "wins": None, "ties": None, "losses": None,
                "num_prompts": 0}
    scores = [POINTS[o] for o in outcomes]
    low, high = bootstrap_interval(scores, num_resamples, confidence, seed)
    return {
        "win_rate": sum(scores) / count,
        "ci_low": low,
        "ci_high": high,
        "wins": sum(o == WIN for o in outcomes) / count,
        "ties": sum(o == TIE for o in outcomes) / count,
        "losses": sum(o == LOSS for o in outcomes) / count,
        "num_prompts": count,
    }


def format_win_rate(rate: float | None, low: float | None, high: float | None, wins: float | None = None,
                    ties: float | None = None, losses: float | None = None) -> str:
    """``61.2% [59.3%, 63.0%] (W/T/L 52.2% / 18.1% / 29.8%)``, as report 1's Table 5 shows it."""
    if rate is None:
        return "-"
    text = f"{rate:.1%} [{low:.1%}, {high:.1%}]"
    if wins is not None:
        text += f" (W/T/L {wins:.1%} / {ties:.1%} / {losses:.1%})"
    return text


__all__ = ["WIN", "TIE", "LOSS", "OUTCOMES", "POINTS", "MODEL", "BASELINE", "outcome_of_scores",
           "combine_preferences", "bootstrap_interval", "win_rate", "format_win_rate"]
