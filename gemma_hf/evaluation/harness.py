"""Optional: academic benchmarks through EleutherAI's lm-evaluation-harness (``lm_eval``).

``lm_eval`` is not a dependency of gemma_hf: it is imported only when :func:`run_lm_eval` runs,
and a missing package raises :class:`LMEvalUnavailable` naming ``pip install lm-eval``.

The model is loaded by gemma_hf (:func:`gemma_hf.sampling.load_chat_model`: a whole Gemma
causal-LM directory, safetensors checked) and handed to lm_eval's ``HFLM`` as a model object, so
lm_eval never has to resolve our ``gemma_hf`` model type itself. Gemma needs exactly one ``<bos>``:
without a chat template the harness's own tokenization adds it (``add_bos_token=True``); with
``apply_chat_template=True`` the run directory's chat template (gemma_hf.chat, which renders the
``<bos>``) is used and the harness must not add a second one (``add_bos_token=False``).

Library behaviours relied on (lm-eval 0.4.x): ``HFLM(pretrained=<model object>, tokenizer=...,
batch_size=..., add_bos_token=...)``; ``lm_eval.simple_evaluate(model=<LM>, tasks=[...],
num_fewshot=..., limit=..., apply_chat_template=..., random_seed=..., numpy_random_seed=...,
torch_random_seed=..., fewshot_random_seed=...)`` returning a dict whose ``"results"`` maps each
task to ``{"metric,filter": value}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from gemma_hf.errors import GemmaHFError

INSTALL_HINT = "pip install lm-eval"


class LMEvalUnavailable(GemmaHFError, ImportError):
    """lm-evaluation-harness is not installed (it is optional)."""


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise LMEvalUnavailable(
            f"lm-evaluation-harness (the `lm_eval` package) is not installed ({err}); it is optional for gemma_hf. "
            f"Install it with `{INSTALL_HINT}` to run benchmark tasks."
        ) from None
    return lm_eval, HFLM


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    device: str | None = None,
    dtype: str = "float32",
    apply_chat_template: bool = False,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
) -> dict:
    """Run lm_eval ``tasks`` on a Gemma causal-LM directory.

    Returns ``{"summary": {"lm_eval/<task>/<metric>": value, ...}, "results": {task: {metric: value}},
    "versions": ..., "n-shot": ..., "settings": {...}}`` (JSON-able: non-finite numbers become None).
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    tasks = [str(t).strip() for t in tasks]
    if not tasks:
        raise ValueError("run_lm_eval needs at least one task name")
    lm_eval, HFLM = _import_lm_eval()

    from gemma_hf.sampling import load_chat_model

    model, tokenizer, _family = load_chat_model(model_dir, dtype=dtype, tokenizer_dir=tokenizer_dir)
    if device is not None:
        model.to(device)
    if apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_dir}: the tokenizer has no chat template (apply_chat_template=True needs one; "
                         "gemma_hf.chat.install_chat_template sets it)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=not apply_chat_template)
    output = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, apply_chat_template=apply_chat_template,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    if output is None:  # non-zero ranks in a distributed run
        return {}
    results = {task: {metric: _jsonable(value) for metric, value in metrics.items()}
               for task, metrics in (output.get("results") or {}).items()}
    summary = {}
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "alias":
                summary[f"lm_eval/{task}/{metric}"] = value
    return {
        "summary": summary,
        "results": results,
        "versions": _jsonable(output.get("versions")),
        "n-shot": _jsonable(output.get("n-shot")),
        "settings": {"model": str(model_dir), "tasks": list(tasks), "num_fewshot": num_fewshot, "limit": limit,
                     "batch_size": batch_size, "dtype": dtype, "apply_chat_template": apply_chat_template,
                     "seed": seed, "lm_eval_version": getattr(lm_eval, "__version__", None)},
    }


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    try:
        number = float(value)  # numpy scalars
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


__all__ = ["LMEvalUnavailable", "INSTALL_HINT", "run_lm_eval"]
