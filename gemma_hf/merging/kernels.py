"""How each method computes one output tensor from the same tensor of every input, piece by piece.

A kernel sees the tensor as element ranges ("pieces") of the flattened tensor, in fixed working
buffers ("slots", :class:`Workspace`): all slots together take the merge's ``buffer_bytes``,
allocated once, whatever the model size and the number of inputs. Inputs are read into the
slots (:class:`.safetensors_stream.PieceReader`); results are rounded once to the output dtype,
checked for NaN/Inf and appended to the output shards.

Arithmetic is float32, or float64 for tensors of fewer than FLOAT64_BELOW_NUMEL elements (norms,
biases: cheap, and exact for hand-checked cases) and whenever an input or the output is float64.

- :class:`WeightedSum`: out_j = sum_k W[j][k] input_k -- linear (one output), LITI (one output per eta);
- :class:`Slerp`: theta_base + sum_i c_i (theta_i - theta_base), with c from the SLERP fold over
  the Gram matrix of the task vectors (:func:`.interpolation.fold_slerp_coefficients`). A tensor
  that fits in one piece is read once; a larger one twice (Gram matrix, then the combination).
"""

from __future__ import annotations

import torch

from . import interpolation
from .safetensors_stream import FLOAT_DTYPES, PieceReader, ShardWriter, TensorInfo

__all__ = ["FLOAT64_BELOW_NUMEL", "NonFiniteOutput", "Workspace", "Kernel", "WeightedSum", "Slerp", "pieces", "all_finite"]

FLOAT64_BELOW_NUMEL = 100_000
_GRAM_BLOCK = 2**18  # elements per block of the Gram matrix computation (1 MiB of float32)


class NonFiniteOutput(Exception):
    """A piece of the output (or SLERP's Gram matrix) holds NaN/Inf; the caller finds out why."""


def pieces(numel: int, piece: int):
    """(start, count) element ranges covering a flattened tensor of `numel` elements."""
    piece = max(1, piece)
    for start in range(0, numel, piece):
        yield start, min(piece, numel - start)


class Workspace:
    """The fixed working buffers ("slots", equal uint8 arenas), the reader, the current writers."""

    RAW = 0  # slot 0 receives stored bytes that need a dtype conversion

    def __init__(self, slots: int, buffer_bytes: int, largest_numel: int):
        slot_bytes = max(64, (buffer_bytes // slots) // 8 * 8)
        slot_bytes = min(slot_bytes, max(64, largest_numel * 8))  # no bigger than the largest tensor needs
        self.slot_bytes = slot_bytes
        # torch.empty does not touch the pages: only what the pieces use becomes resident.
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8) for _ in range(slots)]
        self.reader = PieceReader()
        self.writers: list[ShardWriter] = []
        self.out_dtype: torch.dtype = torch.float32

    def compute_dtype(self, infos: list[TensorInfo]) -> torch.dtype:
        wide = infos[0].numel < FLOAT64_BELOW_NUMEL or self.out_dtype == torch.float64 or any(
            i.dtype == "F64" for i in infos)
        return torch.float64 if wide else torch.float32

    def piece_numel(self, compute: torch.dtype) -> int:
        return self.slot_bytes // compute.itemsize

    def typed(self, slot: int, dtype: torch.dtype, count: int) -> torch.Tensor:
        return self.slots[slot][: count * dtype.itemsize].view(dtype)

    def load(self, info: TensorInfo, start: int, count: int, slot: int, compute: torch.dtype) -> torch.Tensor:
        """Elements [start, start + count) of a tensor, as `compute` dtype, in slot `slot`."""
        if FLOAT_DTYPES[info.dtype] == compute:
            return self.reader.read(info, start, count, self.slots[slot])
        raw = self.reader.read(info, start, count, self.slots[self.RAW])
        out = self.typed(slot, compute, count)
        out.copy_(raw)
        return out

    def emit(self, k: int, name: str, values: torch.Tensor, out_slot: int) -> None:
        """Round `values` to the output dtype, check it, append it to output k's shard."""
        if values.dtype == self.out_dtype:
            out = values
        else:
            out = self.typed(out_slot, self.out_dtype, values.numel())
            out.copy_(values)
        if not all_finite(out):
            raise NonFiniteOutput()
        self.writers[k].write(name, out)


def all_finite(values: torch.Tensor) -> bool:
    """No NaN or Inf in `values`. Fast path: one sum (no temporary), finite only if every element
    is (NaN and Inf propagate through a sum; accumulated in float32 or wider, so a sum of finite
    bfloat16/float16 values does not overflow); if it is not finite, look element by element."""
    total = values.sum(dtype=torch.float64 if values.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(values).all())


class Kernel:
    """How one method computes one tensor. `slots`: the working buffers it needs."""

    slots: int

    def merge(self, ctx: Workspace, name: str, infos: list[TensorInfo]) -> None:
        raise NotImplementedError

    def summary(self) -> dict:
        return {}


class WeightedSum(Kernel):
    """out_j = sum_k W[j][k] * input_k, for one output (linear) or several (LITI's etas)."""

    def __init__(self, weights: list[list[float]]):
        self.weights = weights
        self.inputs = len(weights[0])
        if len(weights) == 1:  # stream the inputs through one buffer: RAW, X, ACC, OUT
            self.slots = 4
        else:  # keep every input's piece for all outputs: RAW, X_1..X_N, ACC, OUT
            self.slots = self.inputs + 3

    def merge(self, ctx, name, infos):
        compute = ctx.compute_dtype(infos)
        acc_slot, out_slot = self.slots - 2, self.slots - 1
        for start, count in pieces(infos[0].numel, ctx.piece_numel(compute)):
            acc = ctx.typed(acc_slot, compute, count)
            if len(self.weights) == 1:
                (w,) = self.weights
                for k, info in enumerate(infos):
                    x = ctx.load(info, start, count, 1, compute)
                    if k == 0:
                        torch.mul(x, w[0], out=acc)
                    else:
                        acc.add_(x, alpha=w[k])
                ctx.emit(0, name, acc, out_slot)
            else:
                xs = [ctx.load(info, start, count, 1 + k, compute) for k, info in enumerate(infos)]
                for j, w in enumerate(self.weights):
                    torch.mul(xs[0], w[0], out=acc)
                    for k in range(1, len(xs)):
                        acc.add_(xs[k], alpha=w[k])
                    ctx.emit(j, name, acc, out_slot)


class Slerp(Kernel):
    """theta = theta_base + sum_i c_i (theta_i - theta_base), c from the fold over the Gram matrix.

    Slots: RAW, BASE, D_1..D_M, ACC, OUT.
    """

    def __init__(self, models: int):
        self.models = models
        self.slots = models + 4
        self._products: torch.Tensor | None = None  # one block of elementwise products
        self.cosines: list[tuple[float, int]] = []  # (cosine of a pair of task vectors, numel)
        self.fallbacks = 0
        self.tensors_with_fallback = 0
        self.zero_task_vectors = 0

    def _deltas(self, ctx, infos, start, count, compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
        base = ctx.load(infos[0], start, count, 1, compute)
        deltas = []
        for i, info in enumerate(infos[1:]):
            delta = ctx.load(info, start, count, 2 + i, compute)
            deltas.append(delta.sub_(base))
        return base, deltas

    def _gram(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """Inner products of the task-vector pieces: products and (cascade) sums of blocks in the
        compute dtype, the blocks' sums added in float64 (measured relative error ~2e-8 for float32
        data; SLERP's coefficients need far less). Plain ATen ops, no BLAS."""
        m, count = self.models, deltas[0].numel()
        dtype = deltas[0].dtype
        if self._products is None or self._products.dtype != dtype:
            self._products = torch.empty(_GRAM_BLOCK, dtype=dtype)
        gram = [[0.0] * m for _ in range(m)]
        for s in range(0, count, _GRAM_BLOCK):
            e = min(count, s + _GRAM_BLOCK)
            products = self._products[: e - s]
            for i in range(m):
                for j in range(i, m):
                    torch.mul(deltas[i][s:e], deltas[j][s:e], out=products)
                    gram[i][j] += torch.sum(products).item()
        for i in range(m):
            for j in range(i):
                gram[i][j] = gram[j][i]
        return torch.tensor(gram, dtype=torch.float64)

    def merge(self, ctx, name, infos):
        compute = ctx.compute_dtype(infos)
        numel = infos[0].numel
        ranges = list(pieces(numel, ctx.piece_numel(compute)))
        if not ranges:
            return
        acc_slot, out_slot = self.slots - 2, self.slots - 1
        gram = torch.zeros((self.models, self.models), dtype=torch.float64)
        for start, count in ranges:
            base, deltas = self._deltas(ctx, infos, start, count, compute)
            gram += self._gram(deltas)
        if not torch.isfinite(gram).all():
            raise NonFiniteOutput()
        coefficients, stats = interpolation.fold_slerp_coefficients(gram)
        self._record(gram, stats, numel)
        if len(ranges) == 1:  # the deltas are still in their slots
            acc = ctx.typed(acc_slot, compute, numel)
            torch.add(base, deltas[0], alpha=coefficients[0], out=acc)
            for c, delta in zip(coefficients[1:], deltas[1:]):
                acc.add_(delta, alpha=c)
            ctx.emit(0, name, acc, out_slot)
            return
        for start, count in ranges:  # a large tensor: read it again and combine
            base = ctx.load(infos[0], start, count, 1, compute)
            acc = ctx.typed(acc_slot, compute, count)
            acc.copy_(base)
            for c, info in zip(coefficients, infos[1:]):
                delta = ctx.load(info, start, count, 2, compute).sub_(base)
                acc.add_(delta, alpha=c)
            ctx.emit(0, name, acc, out_slot)

    def _record(self, gram: torch.Tensor, stats: dict, numel: int) -> None:
        self.fallbacks += stats["lerp_fallbacks"]
        self.tensors_with_fallback += stats["lerp_fallbacks"] > 0
        self.zero_task_vectors += int((torch.diagonal(gram) == 0).sum())
        self.cosines.extend((cos, numel) for cos in stats["cosines"])

    def summary(self) -> dict:
        out = {
            "lerp_fallbacks": self.fallbacks,
            "tensors_with_lerp_fallback": self.tensors_with_fallback,
            "zero_task_vectors": self.zero_task_vectors,
        }
        if self.cosines:
            total = sum(n for _, n in self.cosines)
            out["task_vector_cosine"] = {
                "mean_weighted_by_numel": sum(c * n for c, n in self.cosines) / total,
                "min": min(c for c, _ in self.cosines),
                "max": max(c for c, _ in self.cosines),
            }
        return out

