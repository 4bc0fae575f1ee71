"""Distillation: on-policy (GKD) and offline (stored sampled teacher probabilities, Gemma 2 report §3.2).

One concern per file:

  losses.py   the losses from hidden states, chunked over positions (never [B, T, V] log-probs):
              generalized_jsd (GKD, TRL's JSD(beta) convention), sparse_cross_entropy and the cache
              modes' estimators (target_weights), dense references for the tests
  cache.py    the offline teacher cache: teacher_targets / sample_targets, the sharded safetensors
              directory (CacheWriter, CacheReader, build_cache), fingerprints, check_compatible
  student.py  students built from their teacher's layers (student_from_teacher, every_kth)

The recipe side (``gemma-hf distill``, ``gemma-hf distill-cache``) lives in gemma_hf.recipes.distill
and calls these.
"""

from .cache import (
    CacheError,
    CacheExample,
    CacheMismatchError,
    CacheReader,
    CacheWriter,
    build_cache,
    check_compatible,
    collate,
    dataset_fingerprint,
    manifest_fields,
    read_manifest,
    sample_targets,
    teacher_fingerprint,
    teacher_targets,
    tokenizer_fingerprint,
)
from .losses import (
    generalized_jsd,
    mix_with_next_token,
    next_token_mask,
    sparse_cross_entropy,
    target_weights,
)
from .student import every_kth, parameter_counts, student_config, student_from_teacher

__all__ = [
    "generalized_jsd", "sparse_cross_entropy", "target_weights", "mix_with_next_token", "next_token_mask",
    "sample_targets", "teacher_targets", "build_cache", "CacheWriter", "CacheReader", "CacheExample", "collate",
    "check_compatible", "manifest_fields", "read_manifest", "teacher_fingerprint", "tokenizer_fingerprint",
    "dataset_fingerprint", "CacheError", "CacheMismatchError",
    "student_from_teacher", "student_config", "every_kth", "parameter_counts",
]
