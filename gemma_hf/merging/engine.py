"""The streaming merges -- linear, SLERP of task vectors, LITI -- from model directories to model
directories: the public functions, the checks before writing, the output directory.

A merge walks the tensors once, in the first input's file order, each through a kernel
(:mod:`.kernels`: the per-tensor arithmetic, piece by piece in fixed buffers of ``buffer_bytes``,
64 MiB by default, whatever the model size and the number of inputs). Outputs are safetensors
files whose headers are written first and whose tensors are then streamed in
(:mod:`.safetensors_stream`), in shards of at most ``max_shard_size``. torch runs single-threaded
during a merge unless ``threads`` says otherwise (see DEFAULT_THREADS for the measurement).

Everything is checked before anything is written: parameters (weights and eta within the float32
range of the arithmetic), that no input is given twice and no model is the base (the same directory
or the same weight files, whatever the spelling), every input's config, tensor names, shapes and
dtypes (:mod:`.sources`), the output paths, the free disk space. Values are
checked while streaming: a NaN or Inf in an input (they propagate into every weighted sum and
Gram matrix) or in an output (overflow of the storage dtype) stops the merge with the tensor's
name and file. Each output is built in a temporary sibling directory and renamed when complete
(:func:`gemma_hf.io.atomic_directory`): a failure leaves no output, and an output being replaced
(``overwrite``) stays untouched until the new one is complete.

An output directory holds the weights, config.json (of the first model for linear, of the base
for SLERP and LITI; its dtype field follows ``dtype``), generation_config.json and the tokenizer
files (the first input's that has them, base / first model first), the remote-code .py files of a
gemma_hf checkpoint, and merge.json: the method, its parameters, the inputs (path, kind, weight
files and sizes, index sha256), SLERP statistics, versions.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import atomic_directory, existing_output_refusal
from ..progress import progress as report_progress
from . import interpolation
from .kernels import FLOAT64_BELOW_NUMEL, Kernel, NonFiniteOutput, Slerp, WeightedSum, Workspace, all_finite, pieces
from .safetensors_stream import DTYPE_CODES, FLOAT_DTYPES, ShardWriter, TensorInfo, TensorSpec, parse_size, plan_shards
from .sources import (
    INDEX_FILE,
    SINGLE_FILE,
    MergeError,
    ModelSource,
    check_compatible,
    open_model,
)

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_MAX_SHARD_SIZE",
    "DEFAULT_THREADS",
    "FLOAT64_BELOW_NUMEL",
    "MERGE_RECORD",
    "MergeResult",
    "NonFiniteError",
    "linear_merge",
    "slerp_merge",
    "liti",
]

DEFAULT_BUFFER_BYTES = 64 * 2**20
# torch intra-op threads while merging. The work is streaming (read a piece, a few elementwise
# passes, write): each op is one OpenMP region, and between regions the reader sleeps in a
# syscall. On a busy machine every region then waits for its worker to be scheduled again:
# measured on 2 shared cores, a 6 x 168 MB linear merge ran at 3.8 GB/s with 1 thread and
# 0.2-0.4 GB/s with 2. Pass threads=N (--threads N) on an idle many-core machine.
DEFAULT_THREADS = 1
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default
MERGE_RECORD = "merge.json"
_SIDE_DTYPE_KEYS = ("dtype", "torch_dtype")

Progress = Callable[[int, int], None]


class NonFiniteError(MergeError):
    """An input or output tensor holds NaN or Inf."""


@dataclass
class MergeResult:
    """What a merge did: its outputs, and how much it read and wrote how fast."""

    method: str
    outputs: list[Path]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    stats: dict = field(default_factory=dict)

    @property
    def read_gb_per_s(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9

    def summary(self) -> str:
        where = ", ".join(str(p) for p in self.outputs)
        return (
            f"{self.method}: {self.tensors} tensors, {self.bytes_written / 1e9:.3f} GB written, "
            f"{self.bytes_read / 1e9:.3f} GB read in {self.seconds:.2f} s ({self.read_gb_per_s:.2f} GB/s read) -> {where}"
        )


# ---------------------------------------------------------------------------------------------
# Public API


def linear_merge(
    models: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    normalize: bool = False,
    allow_extrapolation: bool = False,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    buffer_bytes: int | str = DEFAULT_BUFFER_BYTES,
    threads: int | None = DEFAULT_THREADS,
    progress: Progress | None = None,
) -> MergeResult:
    """theta = sum_i w_i theta_i over the model directories `models`, written to `output`.

    `weights`: one per model, finite, summing to 1 (default uniform 1/N); `normalize=True`
    divides them by their sum instead; negative weights need `allow_extrapolation`
    (:func:`.interpolation.check_weights`). The output takes the first model's config.
    """
    models = _model_list(models)
    if len(models) < 1:
        raise MergeError("a linear merge needs at least one model.")
    weights = _checked(interpolation.check_weights, weights, len(models), normalize=normalize,
                       allow_extrapolation=allow_extrapolation)
    sources = [open_model(m) for m in models]
    _check_distinct([("--models", i, m, s) for i, (m, s) in enumerate(zip(models, sources), start=1)], "linear")
    job = _Job("linear", sources, [output], dtype, overwrite, max_shard_size, buffer_bytes, threads, progress)
    record = {"weights": weights, "formula": "theta = sum_i w_i * theta_i"}
    return job.run(WeightedSum([weights]), [record])


def slerp_merge(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    buffer_bytes: int | str = DEFAULT_BUFFER_BYTES,
    threads: int | None = DEFAULT_THREADS,
    progress: Progress | None = None,
) -> MergeResult:
    """WARP's SLERP of task vectors: delta_m = theta_m - theta_base per tensor, folded with
    merged_m = slerp(merged_{m-1}, delta_m, 1/m); theta = theta_base + merged_M. The output takes
    the base's config. See :mod:`.interpolation` for the formula and its degenerate cases."""
    models = _model_list(models)
    if len(models) < 1:
        raise MergeError("a SLERP merge needs at least one model besides the base.")
    sources = [open_model(base)] + [open_model(m) for m in models]
    _check_distinct([("--base", 0, base, sources[0])]
                    + [("--models", i, m, s) for i, (m, s) in enumerate(zip(models, sources[1:]), start=1)], "slerp")
    job = _Job("slerp", sources, [output], dtype, overwrite, max_shard_size, buffer_bytes, threads, progress)
    record = {
        "formula": "theta = theta_base + merged_M; merged_1 = delta_1, merged_m = slerp(merged_{m-1}, delta_m, 1/m), "
                   "delta_m = theta_m - theta_base, one angle per tensor",
        "lerp_when_sin_below": interpolation.PARALLEL_SIN_THRESHOLD,
    }
    return job.run(Slerp(len(models)), [record])


def liti(
    base: str | os.PathLike,
    model: str | os.PathLike,
    etas: float | Sequence[float],
    outputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    allow_extrapolation: bool = False,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    buffer_bytes: int | str = DEFAULT_BUFFER_BYTES,
    threads: int | None = DEFAULT_THREADS,
    progress: Progress | None = None,
) -> MergeResult:
    """LITI: theta_eta = (1 - eta) theta_base + eta theta_model, for one eta or several.

    With several `etas`, `outputs` lists one directory per eta, and both inputs are read once
    for all of them. eta must be finite and >= 0, and <= 1 unless `allow_extrapolation`. The
    outputs take the base's config.
    """
    single = isinstance(etas, (int, float))
    etas = [etas] if single else list(etas)
    outputs = [outputs] if isinstance(outputs, (str, os.PathLike)) else list(outputs)
    if not etas:
        raise MergeError("LITI needs at least one eta.")
    if len(outputs) != len(etas):
        raise MergeError(f"LITI got {len(etas)} eta values but {len(outputs)} outputs; give one output per eta.")
    etas = [_checked(interpolation.check_eta, eta, allow_extrapolation=allow_extrapolation) for eta in etas]
    repeated = sorted({eta for eta in etas if etas.count(eta) > 1})
    if repeated:
        raise MergeError(f"LITI got eta={repeated[0]:g} twice; each eta gives one output, give it once.")
    sources = [open_model(base), open_model(model)]
    _check_distinct([("--base", 0, base, sources[0]), ("--models", 0, model, sources[1])], "liti")
    job = _Job("liti", sources, outputs, dtype, overwrite, max_shard_size, buffer_bytes, threads, progress)
    records = [{"eta": eta, "formula": "theta = (1 - eta) * theta_base + eta * theta_model"} for eta in etas]
    return job.run(WeightedSum([[1.0 - eta, eta] for eta in etas]), records)


def _model_list(models) -> list:
    if isinstance(models, (str, os.PathLike)):
        raise MergeError(f"models must be a list of model directories, got the single path {str(models)!r}.")
    return list(models)


def _checked(check, *args, option: str | None = None, **kwargs):
    """check(*args, **kwargs), its ValueError (or OverflowError) as a MergeError, prefixed with
    `option` (the command line's name of the value) when the check's message does not name it."""
    try:
        return check(*args, **kwargs)
    except (ValueError, OverflowError) as err:
        message = str(err)
        if option and option not in message:
            message = f"{option}: {message}"
        raise MergeError(message) from None


def _weight_file_ids(source: ModelSource) -> frozenset:
    """The identity of a source's weight files (device, inode): the same for a symbolic or a hard link."""
    ids = set()
    for file in source.weight_files:
        try:
            st = os.stat(file)
        except OSError:
            return frozenset()
        ids.add((st.st_dev, st.st_ino))
    return frozenset(ids)


def _check_distinct(entries: list[tuple[str, int, object, ModelSource]], method: str) -> None:
    """Refuse an input given twice, or a model that is the base: the same directory (its resolved
    path: symbolic links, ./A and A/ are one directory) or the same weight files (links to them).

    `entries`: (option, position in the option (0: a single value), the path as given, source).
    Identity is by path and file, not by content: a copy of a model in another directory is a
    different input (comparing contents would read every input once more before merging).
    """
    seen: list[tuple[str, int, object, ModelSource, frozenset]] = []
    for option, position, given, source in entries:
        ids = _weight_file_ids(source)
        for first_option, first_position, first_given, first, first_ids in seen:
            if source.path == first.path:
                how = f"both are the directory {source.path}"
            elif ids and ids == first_ids:
                how = (f"{source.path} holds the very weight files of {first.path} "
                       f"({', '.join(f.name for f in source.weight_files)}, linked)")
            else:
                continue
            this = _named(option, position, given)
            if first_option == "--base":
                if method == "liti":
                    effect = ("LITI between the base and itself gives the base at every eta. Pass the fine-tuned "
                              "model as --models.")
                else:
                    effect = ("its task vector theta - theta_base is zero, so it only drags the merge towards the "
                              "base. Remove it from --models.")
                raise MergeError(f"{this} is the --base {str(first_given)!r} itself ({how}): {effect}")
            raise MergeError(
                f"{this} is the same model as {_named(first_option, first_position, first_given)} ({how}). "
                + ("Averaging a model with itself only counts it twice: list each model once, and give it a "
                   "larger share with --weights." if method == "linear" else
                   "SLERP of a task vector with itself counts it twice: list each run once.")
            )
        seen.append((option, position, given, source, ids))


def _named(option: str, position: int, given) -> str:
    if position == 0:
        return f"{option} {str(given)!r}"
    return f"the {interpolation.ordinal(position)} of {option} ({str(given)!r})"


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "float16", "bfloat16", "float64") else dtype
    if dtype not in DTYPE_CODES:
        raise MergeError(f"dtype must be auto, float32, bfloat16, float16 or float64, got {dtype!r}.")
    return dtype


# ---------------------------------------------------------------------------------------------
# The job: checks, output directories, the tensor loop


class _Job:
    def __init__(self, method, sources: list[ModelSource], outputs, dtype, overwrite, max_shard_size,
                 buffer_bytes, threads, progress):
        self.method = method
        self.sources = sources
        self.primary = sources[0]  # its config (and side files) go to the output
        self.out_dtype = _parse_dtype(dtype)
        self.overwrite = overwrite
        self.max_shard_bytes = _checked(parse_size, max_shard_size, option="--max-shard-size")
        self.buffer_bytes = _checked(parse_size, buffer_bytes, option="--buffer-size")
        if threads is not None:
            cpus = available_cpus()
            if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= cpus:
                raise MergeError(f"--threads must be a whole number from 1 to {cpus} (the CPUs this process may use); "
                                 f"got {threads!r}.")
        self.threads = threads
        self.progress = progress
        check_compatible(sources, mixed_dtypes=self.out_dtype is not None)
        self.outputs = self._check_outputs(outputs)
        self.specs = [
            TensorSpec(name, DTYPE_CODES[self.out_dtype] if self.out_dtype else info.dtype, info.shape)
            for name, info in self.primary.tensors.items()
        ]
        self._check_disk()

    def _check_outputs(self, outputs) -> list[Path]:
        resolved = [Path(o).expanduser().resolve() for o in outputs]
        if len(set(resolved)) != len(resolved):
            raise MergeError("the same output directory is given twice.")
        for out in resolved:
            for source in self.sources:
                if out == source.path or source.path in out.parents:
                    where = "an input" if out == source.path else f"inside the input {source.path}"
                    raise MergeError(f"output {out} is {where}; write the merge somewhere else.")
                if self.overwrite and out in source.path.parents:
                    raise MergeError(
                        f"--overwrite would delete the input {source.path}, which is inside the output {out}.")
            refusal = existing_output_refusal(out, self.overwrite, "--overwrite (overwrite=True)")
            if refusal:  # an overwrite replaces only an empty or a model directory, never the user's files
                raise MergeError(refusal)
        return resolved

    def _check_disk(self) -> None:
        needed = sum(spec.nbytes for spec in self.specs) * len(self.outputs)
        for out in self.outputs:
            anchor = out.parent
            while not anchor.exists():
                anchor = anchor.parent
            free = shutil.disk_usage(anchor).free
            if needed > free:
                raise MergeError(f"the merge writes {needed / 1e9:.2f} GB but {anchor} has {free / 1e9:.2f} GB free.")

    # -- the loop -------------------------------------------------------------------------------
    def run(self, kernel: Kernel, records: list[dict]) -> MergeResult:
        previous = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            return self._run(kernel, records)
        finally:
            torch.set_num_threads(previous)

    def _run(self, kernel: Kernel, records: list[dict]) -> MergeResult:
        start = time.perf_counter()
        shards = plan_shards(self.specs, self.max_shard_bytes)
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
        total_bytes = sum(spec.nbytes for spec in self.specs)
        largest = max((spec.numel for spec in self.specs), default=0)
        ctx = Workspace(kernel.slots, self.buffer_bytes, largest)
        written = 0
        with contextlib.ExitStack() as stack:
            stack.enter_context(ctx.reader)
            bar = stack.enter_context(report_progress(f"{self.method} merge", total=total_bytes * len(self.outputs), unit="B"))
            try:
                tmps = [stack.enter_context(atomic_directory(out, overwrite=self.overwrite)) for out in self.outputs]
            except FileExistsError as err:  # created since the checks
                raise MergeError(f"{err}") from None
            for shard, file_name in zip(shards, names):
                writers = [ShardWriter(tmp / file_name, shard) for tmp in tmps]
                try:
                    for spec in shard:
                        ctx.writers, ctx.out_dtype = writers, FLOAT_DTYPES[spec.dtype]
                        infos = [source.tensors[spec.name] for source in self.sources]
                        try:
                            kernel.merge(ctx, spec.name, infos)
                        except NonFiniteOutput:
                            raise self._non_finite(ctx, spec.name, infos) from None
                        written += spec.nbytes
                        bar.update(spec.nbytes * len(self.outputs))
                        if self.progress is not None:
                            self.progress(written, total_bytes)
                    for writer in writers:
                        writer.close()
                except BaseException:
                    for writer in writers:
                        writer.abort()
                    raise
            seconds = time.perf_counter() - start
            stats = kernel.summary()
            for tmp, record in zip(tmps, records):
                if len(shards) > 1:
                    _write_index(tmp / INDEX_FILE, shards, names)
                self._write_side_files(tmp)
                self._write_record(tmp, record, stats, seconds)
        seconds = time.perf_counter() - start
        return MergeResult(self.method, self.outputs, len(self.specs), ctx.reader.bytes_read,
                           total_bytes * len(self.outputs), seconds, stats)

    def _non_finite(self, ctx: Workspace, name: str, infos: list[TensorInfo]) -> NonFiniteError:
        """The merge of `name` is not finite: find the input that holds NaN/Inf, or call it overflow."""
        for source, info in zip(self.sources, infos):
            for start, count in pieces(info.numel, ctx.slot_bytes // info.itemsize):
                if not all_finite(ctx.reader.read(info, start, count, ctx.slots[0])):
                    return NonFiniteError(f"tensor {name!r} in {source.where(name)} holds NaN or Inf values; "
                                          "refusing to merge it.")
        wider = " or write a wider dtype (--dtype float32)" if ctx.out_dtype.itemsize < 4 else ""
        return NonFiniteError(
            f"the merged tensor {name!r} is not finite: it overflows {ctx.out_dtype} (the inputs are finite). "
            f"Check the weights / eta{wider}."
        )

    # -- the files beside the weights -----------------------------------------------------------
    def _write_side_files(self, tmp: Path) -> None:
        from ..convert import GENERATION_CONFIG, TOKENIZER_FILES

        primary = self.primary
        if self.out_dtype is None:
            shutil.copyfile(primary.config_path, tmp / "config.json")
        else:
            config = dict(primary.config)
            name = str(self.out_dtype).removeprefix("torch.")
            for key in _SIDE_DTYPE_KEYS:
                if key in config or key == "dtype":
                    config[key] = name
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for source in self.sources:  # the primary's, else the first input's that has one
            if (source.path / GENERATION_CONFIG).is_file():
                shutil.copyfile(source.path / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
                break
        for source in self.sources:
            present = [n for n in TOKENIZER_FILES if (source.path / n).is_file()]
            if present:
                for n in present:
                    shutil.copyfile(source.path / n, tmp / n)
                break
        if primary.config.get("auto_map"):  # remote code for trust_remote_code loading
            for code in sorted(primary.path.glob("*.py")):
                shutil.copyfile(code, tmp / code.name)

    def _write_record(self, tmp: Path, record: dict, stats: dict, seconds: float) -> None:
        from .. import __version__

        roles = ["base"] + ["model"] * (len(self.sources) - 1) if self.method != "linear" else ["model"] * len(self.sources)
        inputs = [{"role": role, **source.describe()} for role, source in zip(roles, self.sources)]
        data = {
            "method": self.method,
            **record,
            "inputs": inputs,
            "config_from": str(self.primary.path),
            "dtype": str(self.out_dtype).removeprefix("torch.") if self.out_dtype else "as stored in the inputs",
            "compute": f"float32; float64 for tensors under {FLOAT64_BELOW_NUMEL} elements and float64 inputs",
            "tensors": len(self.specs),
            "bytes": sum(spec.nbytes for spec in self.specs),
            "seconds": round(seconds, 3),
            **({"stats": stats} if stats else {}),
            "gemma_hf_version": __version__,
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MERGE_RECORD).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _write_index(path: Path, shards: list[list[TensorSpec]], names: list[str]) -> None:
    weight_map = {spec.name: file for shard, file in zip(shards, names) for spec in shard}
    total_size = sum(spec.nbytes for shard in shards for spec in shard)
    total_parameters = sum(spec.numel for shard in shards for spec in shard)
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size}, "weight_map": weight_map}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
