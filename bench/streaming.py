"""Peak memory of a tiny SFT run, its mixture in memory vs streamed (``streaming: true``).

Builds JSON Lines copies of the demo instruction data (asset:llamafactory-data/alpaca_en_demo.json,
999 Alpaca records) at several multiples -- each copy's instructions marked with its number, so no
two records are equal -- then runs, each in its own process under ``/usr/bin/time``, the tiny SFT
recipe (recipes/tiny/sft.yaml: 2 layers, the 4,096-entry tokenizer) on each file, with and without
streaming: the same steps, batch, held-out count (12 records) and evaluation. Prints the peak
resident set (the kernel's high-water mark of the whole process: validation, data, model, training,
publish) and the wall time of each run.

    python bench/streaming.py                  # x1, x4, x40 (~40k records); a few minutes on 2 cores
    python bench/streaming.py --multiples 4 40 400 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny" / "sft.yaml"


def build_data(directory: Path, multiple: int) -> Path:
    """``multiple`` copies of the demo records as JSON Lines (copy k's instructions end with "(k)")."""
    from gemma_hf.assets import llamafactory_data

    records = json.loads((llamafactory_data() / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    path = directory / f"alpaca_x{multiple}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for copy in range(multiple):
            for record in records:
                marked = {**record, "instruction": f"{record['instruction']} ({copy})"}
                handle.write(json.dumps(marked, ensure_ascii=False) + "\n")
    return path


def recipe(directory: Path, data: Path, streaming: bool, steps: int) -> Path:
    values = yaml.safe_load(TINY.read_text())
    values.update(datasets=[{"path": str(data)}], test_split_size=12, streaming=streaming, max_steps=steps,
                  eval_steps=steps, save_steps=steps, logging_steps=steps, output_dir=str(directory / "run"))
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def measure(data: Path, streaming: bool, steps: int) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one `gemma-hf sft` process."""
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        config = recipe(Path(tmp), data, streaming, steps)
        report = Path(tmp) / "time.txt"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), sys.executable, "-m", "gemma_hf.cli",
                               "-q", "sft", "--config", str(config)], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"run failed ({data.name}, streaming={streaming}):\n{done.stderr[-3000:]}")
        return int(report.read_text().split()[-1]) / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 40])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="stream-data-") as tmp:
        for multiple in args.multiples:
            data = build_data(Path(tmp), multiple)
            size = data.stat().st_size / 2**20
            for streaming in (False, True):
                rss, wall = measure(data, streaming, args.steps)
                rows.append((multiple, 999 * multiple, size, "streaming" if streaming else "in memory", rss, wall))
                print(f"x{multiple} ({999 * multiple} records, {size:.1f} MiB) {rows[-1][3]}: peak RSS {rss:.0f} MiB, "
                      f"{wall:.1f} s", flush=True)
    print("\n| data | records | file MiB | mixture | peak RSS MiB | wall s |\n|---|---|---|---|---|---|")
    for multiple, records, size, mode, rss, wall in rows:
        print(f"| x{multiple} | {records} | {size:.1f} | {mode} | {rss:.0f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
