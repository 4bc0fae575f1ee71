"""Building the offline teacher cache: :func:`build_cache`, the driver behind ``gemma-hf distill-cache``.

It runs the teacher once over the examples (:func:`example_tokens_and_positions` reads each
record's tokens and target positions), draws K targets per targeted position
(targets.py) and writes them shard by shard (writer.py), skipping shards already complete.

The cache's other parts, one module each: fingerprints.py (teacher, tokenizer, dataset),
manifest.py (the directory format's manifest, its identity fields, the cache's errors),
shards.py (the shard file layout), writer.py (atomic, resumable writes), reader.py (streaming a
complete cache back, check_compatible), batches.py (collate: cache examples -> a batch).

"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

from ..progress import progress as report_progress
from .fingerprints import TokenHash
from .losses import default_chunk_size
from .manifest import manifest_fields
from .shards import CacheExample
from .targets import teacher_targets
from .writer import CacheWriter


def example_tokens_and_positions(example: Mapping) -> tuple[list[int], list[int]]:
    """(input_ids, target positions) of a record, in one of three forms:

    {"prompt_ids", "completion_ids"}: positions predicting the completion tokens;
    {"input_ids", "loss_mask" or "assistant_masks"}: positions t with mask[t + 1] set;
    {"input_ids"}: every position but the last.
    """
    if "prompt_ids" in example:
        prompt, completion = list(example["prompt_ids"]), list(example["completion_ids"])
        if not prompt:
            raise ValueError("an example with completion_ids needs a non-empty prompt (at least <bos>).")
        return prompt + completion, list(range(len(prompt) - 1, len(prompt) + len(completion) - 1))
    ids = list(example["input_ids"])
    mask = example.get("loss_mask", example.get("assistant_masks"))
    if mask is None:
        return ids, list(range(len(ids) - 1))
    mask = list(mask)
    if len(mask) != len(ids):
        raise ValueError(f"loss mask has {len(mask)} entries for {len(ids)} tokens.")
    return ids, [t for t in range(len(ids) - 1) if mask[t + 1]]


def _shard_batches(examples: Iterable, shard_size: int) -> Iterator[list[tuple[list[int], list[int]]]]:
    shard = []
    for example in examples:
        shard.append(example_tokens_and_positions(example))
        if len(shard) == shard_size:
            yield shard
            shard = []
    if shard:
        yield shard


def build_cache(teacher, examples: Iterable[Mapping], directory, *, tokenizer, K: int, temperature: float = 1.0,
                mode: str = "sampled", seed: int = 0, shard_size: int = 256, batch_size: int = 8,
                probs_dtype: str = "float16", chunk_size: int | None = None, teacher_name: str | None = None,
                pad_token_id: int | None = None, progress=None) -> dict:
    """Run the teacher over `examples` once and write (or resume) the cache in `directory`.

    teacher: a GemmaHFForCausalLM (put in eval mode for the run; on any device). examples: records
    in a form :func:`example_tokens_and_positions` reads, consumed in order, once. Shards already
    complete are skipped without running the teacher. `progress(index, entry, skipped)` is called
    after each shard. Returns the finished manifest.
    """
    chunk = chunk_size or default_chunk_size(teacher.config.vocab_size)
    fields = manifest_fields(teacher=teacher, tokenizer=tokenizer, K=K, temperature=temperature, mode=mode, seed=seed,
                             vocab_size=teacher.config.vocab_size, probs_dtype=probs_dtype, teacher_name=teacher_name,
                             batch_size=batch_size, chunk_size=chunk)
    if pad_token_id is None:
        pad_token_id = teacher.config.pad_token_id if teacher.config.pad_token_id is not None else 0
    device = teacher.lm_head.weight.device
    was_training = teacher.training
    teacher.eval()
    dataset_hash = TokenHash()
    try:
        with CacheWriter(directory, fields, shard_size) as writer:
            num_shards = 0
            for index, shard in enumerate(_shard_batches(examples, shard_size)):
                num_shards = index + 1
                shard_tokens, shard_positions = TokenHash(), TokenHash()
                for ids, positions in shard:
                    shard_tokens.update(ids)
                    shard_positions.update(positions)
                    dataset_hash.update(ids)
                if writer.shard_is_complete(index, shard_tokens.hexdigest(), shard_positions.hexdigest()):
                    if progress:
                        progress(index, writer.entry(index), True)
                    continue
                generator = writer.generator(index, device)
                written = []
                with report_progress(f"teacher cache, shard {index}", total=len(shard), unit="examples",
                                     leave=False) as bar:
                    for start in range(0, len(shard), batch_size):
                        batch = shard[start:start + batch_size]
                        width = max(len(ids) for ids, _ in batch)
                        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.int64)
                        attention_mask = torch.zeros(len(batch), width, dtype=torch.int64)
                        positions_mask = torch.zeros(len(batch), width, dtype=torch.bool)
                        for row, (ids, positions) in enumerate(batch):
                            input_ids[row, :len(ids)] = torch.tensor(ids)
                            attention_mask[row, :len(ids)] = 1
                            positions_mask[row, positions] = True
                        target_ids, probs = teacher_targets(teacher, input_ids.to(device), attention_mask.to(device),
                                                            positions_mask.to(device), K, temperature, mode, generator,
                                                            chunk)
                        target_ids, probs = target_ids.cpu(), probs.cpu()
                        row0 = 0
                        for ids, positions in batch:
                            rows = slice(row0, row0 + len(positions))
                            written.append(CacheExample(torch.tensor(ids, dtype=torch.int32),
                                                        torch.tensor(positions, dtype=torch.int32),
                                                        target_ids[rows], probs[rows]))
                            row0 += len(positions)
                        bar.update(len(batch))
                entry = writer.write_shard(index, written)
                if progress:
                    progress(index, entry, False)
            return writer.finish(dataset_hash.hexdigest(), num_shards=num_shards)
    finally:
        if was_training:
            teacher.train()


__all__ = [
    "build_cache", "example_tokens_and_positions",
]
