"""Distillation: on-policy (GKD) and offline (stored sampled teacher probabilities, Gemma 2 report §3.2).

One job per file; imports go one way, down this list's dependencies (nothing imports a trainer):

  losses.py        the losses from hidden states, chunked over positions (never [B, T, V] log-probs):
                   generalized_jsd (GKD, TRL's JSD(beta) convention), sparse_cross_entropy and the cache
                   modes' estimators (target_weights), next_token_nll, dense references for the tests
  targets.py       the teacher's K sampled (or top-K) targets per position: teacher_targets, sample_targets
  fingerprints.py  teacher / tokenizer / dataset fingerprints
  manifest.py      the cache manifest: manifest_fields, read_manifest, the cache's errors
  shards.py        the cache's shard files: CacheExample, their layout, checking and loading one
  writer.py        CacheWriter: atomic, resumable shard-by-shard writes
  reader.py        CacheReader (streamed shard by shard, each shard verified as read), check_cache_files
                   (the files against the manifest), check_compatible
  cache.py         build_cache: runs the teacher once and writes the cache (gemma-hf distill-cache)
  batches.py       the trainers' batches (prompt | completion; collated cache examples) and the
                   student's backbone and head as the losses take them (PEFT unwrapped)
  trainer.py       the on-policy (GKD) trainer and the held-out metrics of every distill run
  offline.py       the offline trainer, streaming the cache
  student.py       students built from their teacher's layers (student_from_teacher, every_kth)

The recipe side (``gemma-hf distill``, ``gemma-hf distill-cache``) lives in gemma_hf.recipes.distill,
which picks the trainer (on-policy or offline) and calls these.
"""

from .batches import collate
from .cache import build_cache
from .fingerprints import dataset_fingerprint, teacher_fingerprint, tokenizer_fingerprint
from .losses import (
    generalized_jsd,
    mix_with_next_token,
    next_token_mask,
    sparse_cross_entropy,
    target_weights,
)
from .manifest import CacheError, CacheMismatchError, DamagedCacheError, manifest_fields, read_manifest
from .reader import CacheReader, check_cache_files, check_compatible
from .shards import CacheExample
from .student import every_kth, parameter_counts, student_config, student_from_teacher
from .targets import sample_targets, teacher_targets
from .writer import CacheWriter

__all__ = [
    "generalized_jsd", "sparse_cross_entropy", "target_weights", "mix_with_next_token", "next_token_mask",
    "sample_targets", "teacher_targets", "build_cache", "CacheWriter", "CacheReader", "CacheExample", "collate",
    "check_compatible", "manifest_fields", "read_manifest", "teacher_fingerprint", "tokenizer_fingerprint",
    "dataset_fingerprint", "CacheError", "CacheMismatchError", "DamagedCacheError", "check_cache_files",
    "student_from_teacher", "student_config", "every_kth", "parameter_counts",
]
