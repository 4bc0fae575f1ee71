"""Weight averaging of Gemma checkpoints: linear, SLERP of task vectors, LITI (WARP), and EMA.

WARP (Ramé et al. 2024, "WARP: On the Benefits of Weight Averaged Rewarded Policies") averages
weights at three stages: an EMA anchor during each RL run (:func:`ema_update`), SLERP of the M
runs' task vectors (:func:`slerp_merge`), and LITI, the interpolation from the initialisation
towards that merge, which gives the next iteration's initialisation (:func:`liti`). A plain
weighted average (:func:`linear_merge`) averages checkpoints across training phases.

=========================================================  ==========================================
call                                                       computes, per tensor
=========================================================  ==========================================
``linear_merge(models, out, weights=None)``                sum_i w_i theta_i (w uniform by default, sums to 1)
``slerp_merge(base, models, out)``                         theta_base + fold of slerp over delta_m = theta_m - theta_base
``liti(base, model, etas, outputs)``                       (1 - eta) theta_base + eta theta_model, one output per eta
``ema_update(ema, current, mu)``                           ema <- (1 - mu) ema + mu current, in place (tensors, state dicts, modules)
``slerp(u, v, lam)``, ``slerp_task_vectors(deltas)``       the same arithmetic on tensors in memory
=========================================================  ==========================================

The file-level merges take model directories (gemma_hf or stock Gemma checkpoints, sharded or
not, finished gemma-hf run directories) and write a complete model directory: weights,
config.json, generation_config.json, tokenizer files, the remote-code files of gemma_hf
checkpoints, and ``merge.json`` (method, inputs, weights/eta, versions). They stream: working
memory is ``buffer_bytes`` (64 MiB by default) whatever the model size and the number of inputs.
Command line: ``gemma-hf merge --method linear|slerp|liti ...`` (:mod:`gemma_hf.commands.merge`).

Files: :mod:`.interpolation` (the arithmetic, on tensors and numbers), :mod:`.sources` (the
inputs and their checks), :mod:`.safetensors_stream` (piecewise reads and writes),
:mod:`.kernels` (one output tensor, piece by piece), :mod:`.engine` (the merges, end to end).
"""

from .engine import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_MAX_SHARD_SIZE,
    DEFAULT_THREADS,
    FLOAT64_BELOW_NUMEL,
    MERGE_RECORD,
    MergeResult,
    NonFiniteError,
    liti,
    linear_merge,
    slerp_merge,
)
from .interpolation import (
    PARALLEL_SIN_THRESHOLD,
    WEIGHT_SUM_TOLERANCE,
    check_eta,
    check_weights,
    ema_update,
    fold_slerp_coefficients,
    slerp,
    slerp_coefficients,
    slerp_task_vectors,
)
from .sources import IncompatibleModelsError, MergeError, ModelSource, open_model

__all__ = [
    "linear_merge",
    "slerp_merge",
    "liti",
    "ema_update",
    "slerp",
    "slerp_coefficients",
    "slerp_task_vectors",
    "fold_slerp_coefficients",
    "check_weights",
    "check_eta",
    "open_model",
    "ModelSource",
    "MergeResult",
    "MergeError",
    "IncompatibleModelsError",
    "NonFiniteError",
    "PARALLEL_SIN_THRESHOLD",
    "WEIGHT_SUM_TOLERANCE",
    "FLOAT64_BELOW_NUMEL",
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_MAX_SHARD_SIZE",
    "DEFAULT_THREADS",
    "MERGE_RECORD",
]
