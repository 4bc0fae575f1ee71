"""Benchmark of the streaming merges (gemma_hf.merging): throughput and peak memory at a real size.

Builds M + 1 random checkpoints shaped like a preset (default: Gemma 3 270M, 268M parameters,
~1.07 GB each in float32), then, each in its own subprocess:

- read once: `cat` of every input file, and safetensors' own read (safe_open + get_tensor of every
  tensor), both from the page cache, as the merges read (the files were just written);
- write once: `cp` of one checkpoint file (every merge writes one checkpoint's bytes);
- slerp: SLERP of the M runs' task vectors (base + M inputs);
- linear: uniform average of the M runs.

For each merge it prints the bytes read, seconds, GB/s (bytes read per second), the floor (its
reads at cat speed plus one checkpoint written at cp speed), and the growth of peak RSS over the
process's resident set after imports and a warm-up merge (the kernel's high-water mark, reset
with /proc/self/clear_refs), next to the size of one checkpoint.

    python bench/merge.py                   # Gemma 3 270M shape, M = 4, float32 (~5.4 GB of inputs)
    python bench/merge.py --dtype bfloat16  # half the bytes
    python bench/merge.py --preset gemma3-270m --models 2 --workdir /big/disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, os, re, shutil, subprocess, sys, time
from pathlib import Path

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

task, root, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
inputs = sorted(p for p in root.iterdir() if p.name.startswith("ckpt-"))
files = [f for d in inputs for f in sorted(d.glob("*.safetensors"))]
if task == "cat":
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"bytes": sum(f.stat().st_size for f in files), "seconds": seconds}))
    sys.exit()
if task == "cp":  # writing one checkpoint's bytes: what every merge must write
    start = time.perf_counter()
    subprocess.run(["cp", str(files[1]), str(root / "copy.safetensors")], check=True)
    seconds = time.perf_counter() - start
    size = files[1].stat().st_size
    (root / "copy.safetensors").unlink()
    print(json.dumps({"bytes": size, "seconds": seconds}))
    sys.exit()
if task == "safetensors":
    from safetensors import safe_open
    start, total = time.perf_counter(), 0
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                t = handle.get_tensor(name)
                total += t.numel() * t.element_size()
                t.sum()  # touch every byte, as a merge must
                del t
    print(json.dumps({"bytes": total, "seconds": time.perf_counter() - start}))
    sys.exit()

from gemma_hf.merging import linear_merge, slerp_merge
tiny = sorted(p for p in root.iterdir() if p.name.startswith("tiny-"))
slerp_merge(tiny[0], tiny[1:], root / "warm-slerp", overwrite=True, threads=threads)
linear_merge(tiny[1:], root / "warm-linear", overwrite=True, threads=threads)
out = root / f"out-{task}"
if out.exists():  # the previous run's output: deleting it (ext4 with discard) is not part of a merge
    shutil.rmtree(out)
    os.sync()
open("/proc/self/clear_refs", "w").write("5")
baseline = status("VmRSS")
if task == "slerp":
    result = slerp_merge(inputs[0], inputs[1:], out, threads=threads)
else:
    result = linear_merge(inputs[1:], out, threads=threads)
print(json.dumps({"bytes": result.bytes_read, "written": result.bytes_written, "seconds": result.seconds,
                  "rss_growth": status("VmHWM") - baseline, "baseline_rss": baseline, "tensors": result.tensors}))
"""


def build_checkpoints(root: Path, preset: str, models: int, dtype: str) -> int:
    """ckpt-0 (the base) .. ckpt-M, random weights of the preset's shapes; returns one's bytes."""
    import torch
    from safetensors.torch import save_file

    from gemma_hf import GemmaHFForCausalLM, get_preset

    config = get_preset(preset).build_config()
    torch_dtype = getattr(torch, dtype)
    config.dtype = dtype
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GemmaHFForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(0)
    size = 0
    for i in range(models + 1):
        directory = root / f"ckpt-{i}"
        directory.mkdir()
        config.save_pretrained(directory)
        tensors = {}
        for name, shape in shapes.items():
            t = torch.empty(shape, dtype=torch.float32)
            t.normal_(generator=gen).mul_(0.02)
            tensors[name] = t.to(torch_dtype)
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        size = (directory / "model.safetensors").stat().st_size
        del tensors
        if i < 3:  # a tiny copy (same names, a few elements each) for the warm-up merges
            tiny = root / f"tiny-{i}"
            tiny.mkdir()
            config.save_pretrained(tiny)
            save_file({n: torch.randn(4, generator=gen).to(torch_dtype) for n in shapes}, str(tiny / "model.safetensors"))
    return size


def run_worker(task: str, root: Path, threads: int) -> dict:
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", WORKER, task, str(root), str(threads)], capture_output=True,
                            text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{task} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gemma3-270m")
    parser.add_argument("--models", type=int, default=4, help="M, the runs merged (SLERP adds a base)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads during the merges")
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the median is shown)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--reuse", default=None, help="a directory of checkpoints kept by an earlier --keep run")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    if args.reuse:
        root = Path(args.reuse)
        size = (root / "ckpt-0" / "model.safetensors").stat().st_size
        args.models = len(list(root.glob("ckpt-*"))) - 1
        args.keep = True
    else:
        root = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    try:
        if not args.reuse:
            start = time.perf_counter()
            size = build_checkpoints(root, args.preset, args.models, args.dtype)
            print(f"built {args.models + 1} checkpoints of {size / 1e9:.3f} GB ({args.preset}, {args.dtype}) "
                  f"in {time.perf_counter() - start:.0f} s under {root}", flush=True)
        results = {"preset": args.preset, "dtype": args.dtype, "models": args.models, "checkpoint_bytes": size,
                   "threads": args.threads, "cpus": os.cpu_count(), "load_average": os.getloadavg()}
        for task in ("cat", "cp", "safetensors", "slerp", "linear"):
            runs = []
            for _ in range(args.repeats):
                # Flush dirty pages first (the checkpoints just built, the last output): the files stay
                # cached, and no writeback of earlier work competes with this measurement.
                os.sync()
                runs.append(run_worker(task, root, args.threads))
            results[task] = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]  # the median run
            results[task]["gb_per_s"] = results[task]["bytes"] / results[task]["seconds"] / 1e9
            results[task]["all_seconds"] = [round(r["seconds"], 3) for r in runs]
            print(f"  {task:12s} {json.dumps(results[task])}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    cat, cp = results["cat"]["gb_per_s"], results["cp"]["gb_per_s"]
    print()
    print(f"one checkpoint: {size / 1e6:.0f} MB. Reading the inputs once: cat {cat:.2f} GB/s, safetensors "
          f"{results['safetensors']['gb_per_s']:.2f} GB/s; writing one checkpoint (cp): {cp:.2f} GB/s.")
    print("floor = the merge's reads at cat speed + one checkpoint written at cp speed")
    print(f"{'merge':8s} {'inputs':>6s} {'GB read':>8s} {'seconds':>8s} {'GB/s':>6s} {'floor s':>8s} "
          f"{'peak RSS growth':>16s} {'/ checkpoint':>12s}")
    for task, n in (("slerp", args.models + 1), ("linear", args.models)):
        r = results[task]
        floor = r["bytes"] / cat / 1e9 + size / cp / 1e9
        r["floor_seconds"] = floor
        print(f"{task:8s} {n:6d} {r['bytes'] / 1e9:8.2f} {r['seconds']:8.2f} {r['gb_per_s']:6.2f} {floor:8.2f} "
              f"{r['rss_growth'] / 1e6:13.0f} MB {r['rss_growth'] / size:12.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
