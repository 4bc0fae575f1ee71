"""A streamed mixture (``streaming: true``): the training split read as a ``datasets.IterableDataset``,
record by record from its sources on every epoch, never held in memory.

Validation checks every record as it does without streaming, but keeps only each dataset's count
(``data.read_dataset(..., keep_records=False)``). The run then needs memory for the held-out split
(``test_split_size`` records, evaluated repeatedly, so kept), the shuffle buffer
(``shuffle_buffer_size`` examples) and one record at a time, whatever the size of the mixture. (A
JSON array or CSV file is parsed whole on each pass, see sources.py: stream JSON Lines or Parquet.)

**The held-out split** is chosen by a keyed hash, not by datasets' ``train_test_split`` (which needs
the records in memory). Record ``r`` of dataset ``d`` -- its position among that dataset's records,
from 0, after a split slice -- gets the key ``blake2b("{split_seed}/{d}/{r}")`` (64 bits, the same on
every machine and Python); the held-out records are the ``n`` with the smallest keys, ``n`` being
``test_split_size`` (a count, or ``ceil(fraction * records)``, as validation counts it). The choice
depends only on the split seed (``split_seed``, else ``seed``) and the datasets' record counts: the
same recipe always holds out the same records, and choosing them reads no record (a heap of ``n``
keys). It is not the selection of the in-memory split: switching ``streaming`` holds out other records.

**The training order.** The datasets are interleaved at random, seeded by ``seed``: each next record
comes from a dataset with probability proportional to its records not yet read, so every dataset is
spread over the whole epoch and every record comes exactly once per epoch. Then the method prepares
the stream (tokenizes, drops long examples), and a shuffle buffer of ``shuffle_buffer_size`` examples
mixes it (``IterableDataset.shuffle``): an approximate shuffle, an example moves at most a buffer's
length earlier.

Library behaviours relied on (easy to break on upgrades):
- ``IterableDataset.from_generator`` calls the generator again for each pass (epoch), and shards
  ``gen_kwargs`` lists across dataloader workers: we pass no lists, so the stream is one shard (extra
  workers stop at once with a warning, none reads a record twice).
- The Trainer (through accelerate's ``DataLoaderShard.set_epoch``) calls the dataset's ``set_epoch``
  at each epoch, which reseeds ``IterableDataset.shuffle`` (seed + epoch): another order each epoch. A
  release that stops doing so repeats the first epoch's order.
- TRL's SFTTrainer takes an IterableDataset with ``input_ids`` as tokenized (it maps labels and
  truncation lazily) and needs ``max_steps`` for it: validation requires it.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass

from gemma_hf.chat import CONTROL_TOKENS

from .data import ReadDataset, held_out_count, held_out_seed, iter_canonical
from .schema import DataArguments



def stream_features(data_format: str):
    """The schema of the canonical records a streamed mixture holds (datasets needs an IterableDataset's
    column names up front: TRL and our map read them). Conversations only: streaming is for sft."""
    from datasets import Features, List, Value

    if data_format != "conversation":
        raise ValueError(f"a streamed mixture holds conversations, not {data_format} records")
    return Features({"messages": List({"role": Value("string"), "content": Value("string")})})


def held_out_key(split_seed: int, dataset_index: int, position: int) -> int:
    """The 64-bit key that ranks a record for the held-out split (smallest keys are held out)."""
    digest = hashlib.blake2b(f"{split_seed}/{dataset_index}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choose_held_out(counts: list[int], size: int | float | None, split_seed: int) -> frozenset[tuple[int, int]]:
    """The (dataset index, position) pairs of the held-out split: the smallest keys (module docstring)."""
    n = held_out_count(size, sum(counts))
    if n <= 0:
        return frozenset()
    keys = ((held_out_key(split_seed, d, r), d, r) for d, count in enumerate(counts) for r in range(count))
    return frozenset((d, r) for _, d, r in heapq.nsmallest(n, keys))


@dataclass
class StreamedMixture:
    """The mixture of a ``streaming: true`` recipe: its datasets (counted, not held), the held-out
    positions, and how to read either split."""

    parts: list[ReadDataset]
    data_format: str
    family: str
    seed: int  # the interleaving's
    held_out: frozenset[tuple[int, int]]

    @property
    def taken(self) -> list[int]:  # records of each dataset in the mixture (no fraction: refused at validation)
        return [part.count for part in self.parts]

    @property
    def train_records(self) -> int:
        return sum(self.taken) - len(self.held_out)

    def _records(self, index: int) -> Iterator[tuple[int, dict]]:
        """(position, canonical record) of dataset ``index``; its count is checked at the end."""
        part = self.parts[index]
        position = -1
        for position, record in enumerate(iter_canonical(part, index, self.data_format, self.family, CONTROL_TOKENS)):
            if position >= part.count:
                break
            yield position, record
        if position + 1 != part.count:
            raise RuntimeError(f"{part.spec.path} changed since it was checked: it held {part.count} records, now "
                               f"{position + 1 if position + 1 < part.count else 'more'}")

    def held_out_records(self) -> list[dict]:
        """The held-out records, in mixture order (one pass over the datasets that hold any)."""
        wanted = {d for d, _ in self.held_out}
        out = []
        for d in sorted(wanted):
            out.extend(record for r, record in self._records(d) if (d, r) in self.held_out)
        return out

    def training_records(self) -> Iterator[dict]:
        """One epoch of the training split: the datasets interleaved (module docstring), held-out records skipped."""
        rng = random.Random(self.seed)
        streams = [self._records(d) for d in range(len(self.parts))]
        remaining = [part.count for part in self.parts]
        total = sum(remaining)
        while total:
            pick = rng.randrange(total)
            d = 0
            while pick >= remaining[d]:
                pick -= remaining[d]
                d += 1
            remaining[d] -= 1
            total -= 1
            r, record = next(streams[d])
            if (d, r) not in self.held_out:
                yield record
        for stream in streams:  # runs each dataset's end-of-stream count check
            for _ in stream:
                pass

    def training_stream(self):
        """The training split as a ``datasets.IterableDataset`` of canonical records (unshuffled: see
        :func:`shuffled`)."""
        import datasets

        features = stream_features(self.data_format)
        # The mixture is passed as a single object, not in a list: from_generator shards gen_kwargs lists.
        return datasets.IterableDataset.from_generator(_generate, features=features, gen_kwargs={"mixture": self})


def _generate(mixture: StreamedMixture) -> Iterator[dict]:
    yield from mixture.training_records()


def load_streamed_mixture(parts: list[ReadDataset], data: DataArguments, data_format: str, family: str,
                          seed: int) -> StreamedMixture:
    counts = [part.count for part in parts]
    held_out = choose_held_out(counts, data.test_split_size, held_out_seed(data, seed))
    return StreamedMixture(parts, data_format, family, seed, held_out)


def shuffled(dataset, data: DataArguments, seed: int):
    """``dataset`` (an IterableDataset) through a seeded shuffle buffer of ``shuffle_buffer_size``."""
    return dataset.shuffle(seed=seed, buffer_size=data.shuffle_buffer_size)


__all__ = ["StreamedMixture", "load_streamed_mixture", "choose_held_out", "held_out_key",
           "shuffled", "stream_features"]
