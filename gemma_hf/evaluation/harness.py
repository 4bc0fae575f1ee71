"""Optional: academic benchmarks through EleutherAI's lm-evaluation-harness (``lm_eval``).

``lm_eval`` is an optional dependency of gemma_hf (the ``[eval]`` extra, pinned in constraints.txt;
``make install`` installs it): it is imported only when :func:`run_lm_eval` runs, and a missing package
raises :class:`LMEvalUnavailable` naming the install command.

Tasks are lm-eval's own (``hellaswag``, ``arc_easy``, ...: their data comes from the Hub) or your own:
``include_path`` names a directory of task YAML files (lm-eval's ``TaskManager(include_path=...)``), whose
data may be local files (``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``), so a task can
run with no network at all.

The model is loaded by gemma_hf (:func:`gemma_hf.sampling.load_chat_model`: a whole Gemma
causal-LM directory, safetensors checked) and handed to lm_eval's ``HFLM`` as a model object, so
lm_eval never has to resolve our ``gemma_hf`` model type itself (``backend="causal"``: lm-eval cannot tell
from the ``gemma_hf`` model type, which transformers' own tables do not list). Gemma needs exactly one ``<bos>``:
without a chat template the harness's own tokenization adds it (``add_bos_token=True``); with
``apply_chat_template=True`` the run directory's chat template (gemma_hf.chat, which renders the
``<bos>``) is used and the harness must not add a second one (``add_bos_token=False``).

Library behaviours relied on (lm-eval 0.4.x, tested with 0.4.13): ``HFLM(pretrained=<model object>,
backend="causal", tokenizer=..., batch_size=..., add_bos_token=...)``; ``lm_eval.tasks.TaskManager(
include_path=...)``; ``lm_eval.simple_evaluate(model=<LM>, tasks=[...], num_fewshot=..., limit=...,
apply_chat_template=..., task_manager=..., random_seed=..., numpy_random_seed=..., torch_random_seed=...,
fewshot_random_seed=...)`` returning a dict whose ``"results"`` maps each task to ``{"metric,filter": value}``
(tests/test_lm_eval.py runs a local task end to end).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from gemma_hf.errors import GemmaHFError

INSTALL_HINT = "pip install 'gemma_hf[eval]'"


class LMEvalUnavailable(GemmaHFError, ImportError):
    """lm-evaluation-harness is not installed (it is optional)."""


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise LMEvalUnavailable(
            f"lm-evaluation-harness (the `lm_eval` package) is not installed ({err}); it is optional for gemma_hf. "
            f"Install it with `{INSTALL_HINT}` (or `pip install lm-eval`) to run benchmark tasks."
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
    include_path: str | Path | None = None,
) -> dict:
    """Run lm_eval ``tasks`` on a Gemma causal-LM directory; ``include_path``: a directory of your own task
    YAML files, registered beside lm-eval's.

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
    model.eval()
    lm = HFLM(pretrained=model, backend="causal", tokenizer=tokenizer, batch_size=batch_size,
              add_bos_token=not apply_chat_template)
    output = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, apply_chat_template=apply_chat_template,
        task_manager=_task_manager(tasks, include_path), random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
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
                     "include_path": str(include_path) if include_path is not None else None,
                     "batch_size": batch_size, "dtype": dtype, "apply_chat_template": apply_chat_template,
                     "seed": seed, "lm_eval_version": getattr(lm_eval, "__version__", None)},
    }


def _task_manager(tasks: Sequence[str], include_path: str | Path | None):
    """lm-eval's TaskManager for ``tasks``: None (lm-eval's own, built by simple_evaluate) without an include
    path; the include path's tasks alone when they are all there (indexing lm-eval's thousands of task
    files takes about 12 s on 2 cores, the include path's about 1 s); else both."""
    if include_path is None:
        return None
    from lm_eval.tasks import TaskManager

    own = TaskManager(include_path=str(include_path), include_defaults=False)
    if all(task in own.all_tasks for task in tasks):
        return own
    return TaskManager(include_path=str(include_path))


def markdown_lm_eval(harness: dict) -> str:
    """:func:`run_lm_eval`'s results as a Markdown table (task, documents, metric, value, standard error)."""
    rows = []
    for task, metrics in (harness.get("results") or {}).items():
        for metric, value in metrics.items():
            name, _, filt = metric.partition(",")
            if not is_metric(metric) or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
            shown = f"{stderr:.4f}" if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) else "-"
            label = name + (f" ({filt})" if filt and filt != "none" else "")
            rows.append(f"| `{task}` | {metrics.get('sample_len', '-')} | {label} | {value:.4f} | {shown} |")
    settings = harness.get("settings") or {}
    shots = settings.get("num_fewshot")
    lines = [f"lm-evaluation-harness {settings.get('lm_eval_version') or ''}, "
             + (f"{shots}-shot" if shots is not None else "each task's own number of shots")
             + (f", limit {settings['limit']}" if settings.get("limit") is not None else "") + ":", "",
             "| task | documents | metric | value | stderr |", "|---|---|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def is_metric(key: str) -> bool:
    """A result key of lm-eval that is a score ("acc,none"), not its standard error, document count or alias."""
    name = key.partition(",")[0]
    return not name.endswith("_stderr") and name not in ("alias", "name", "sample_len")


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


__all__ = ["LMEvalUnavailable", "INSTALL_HINT", "run_lm_eval", "markdown_lm_eval", "is_metric"]
