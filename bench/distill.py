"""Benchmark of the on-policy distillation loss: ours (chunked, from hidden states) vs TRL's GKD path.

One distillation step -- student forward, teacher forward (no grad), generalised JSD (beta 0.5,
both final soft-caps 30), backward -- at vocab 256000, Gemma-2-shaped tiny bodies (hidden 256,
2 layers, local + global, attention soft-cap 50) for student and teacher, batch 1, fp32:

- ours: ``gemma_hf.distillation.losses.generalized_jsd`` from both backbones' hidden states
  ([chunk, V] blocks; never [T, V] log-probs);
- trl:  TRL 1.16's experimental ``GKDTrainer.compute_loss`` path reproduced on the same models and
  inputs: full soft-capped logits of both models (``model(...).logits``), shifted, then
  ``GKDTrainer.generalized_jsd_loss``;
- floor: what any implementation must do at this shape on this machine: the two head projections
  ([T, H] x [H, V], student and teacher), the two gradient matmuls of the student head (dh, dW),
  and one softmax pass over [T, V] per model (the fastest of its runs, like the steps).

Each runs in its own subprocess, in the order floor, ours, TRL, ours, floor (so a linear drift in
machine speed biases neither; TRL's path, slow and ~19 GB at seq 1024, runs once); time is the
fastest timed step (the least disturbed on a shared machine; the median is printed too). Peak
RSS is the step's own: the kernel's high-water mark is reset (/proc/self/clear_refs) after the
models are built and a warm-up step has run, so the number is the largest resident set during
the timed steps (models and warm caches included); "growth" subtracts the resident set just
before them. Both paths print their loss, and the table checks they agree (same models, same
inputs).

    python bench/distill.py            # seq 1024, 2 timed steps per run (~15 min on 2 cores, 20 GB)
    python bench/distill.py --quick    # seq 512, floor, ours, TRL once each, 1 timed step
    python bench/distill.py --cache-bytes   # the offline cache's bytes per target, K = 16/64/256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BODY = dict(
    family="gemma2", vocab_size=256000, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=4096,
    layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    max_position_embeddings=8192,
)
BETA = 0.5


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _models(seq: int):
    import torch

    from gemma_hf import GemmaHFConfig, GemmaHFForCausalLM

    torch.manual_seed(0)
    student = GemmaHFForCausalLM._from_config(GemmaHFConfig(**BODY), attn_implementation="eager").train()
    torch.manual_seed(1)
    teacher = GemmaHFForCausalLM._from_config(GemmaHFConfig(**BODY), attn_implementation="eager").eval()
    teacher.requires_grad_(False)
    ids = torch.randint(3, BODY["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(2))
    ids[0, 0] = 2
    return student, teacher, ids


def worker_step(impl: str, seq: int, repeats: int) -> dict:
    import torch

    student, teacher, ids = _models(seq)
    attention = torch.ones_like(ids)
    labels = ids.clone()
    losses = []

    if impl == "ours":
        from gemma_hf.distillation.losses import generalized_jsd, next_token_mask

        mask = next_token_mask(labels)  # position t counts when token t + 1 is a label (TRL's shift)

        def step():
            student.zero_grad(set_to_none=True)
            s_hidden = student.model(input_ids=ids, attention_mask=attention).last_hidden_state
            with torch.no_grad():
                t_hidden = teacher.model(input_ids=ids, attention_mask=attention).last_hidden_state
            loss = generalized_jsd(s_hidden, student.lm_head.weight, t_hidden, teacher.lm_head.weight, mask,
                                   beta=BETA, student_softcap=student.config.final_logit_softcapping,
                                   teacher_softcap=teacher.config.final_logit_softcapping)
            loss.backward()
            losses.append(loss.item())
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.gkd import GKDTrainer

        def step():  # GKDTrainer.compute_loss, minus the Trainer around it
            student.zero_grad(set_to_none=True)
            s_logits = student(input_ids=ids, attention_mask=attention).logits
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=attention).logits
            loss = GKDTrainer.generalized_jsd_loss(student_logits=s_logits[:, :-1, :],
                                                   teacher_logits=t_logits[:, :-1, :], labels=labels[:, 1:],
                                                   beta=BETA)
            loss.backward()
            losses.append(loss.item())
            del s_logits, t_logits, loss

    step()  # warm-up
    rss_before = _rss_kb("VmRSS")
    _reset_peak()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _rss_kb("VmHWM")
    return {"time_s": statistics.median(times), "times": times, "peak_rss_mb": peak / 1024,
            "growth_mb": (peak - rss_before) / 1024, "loss": losses[-1]}


def worker_floor(seq: int, repeats: int) -> dict:
    import torch

    hidden, vocab = BODY["hidden_size"], BODY["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(seq, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.05
    z = torch.empty(seq, vocab)
    dh = torch.empty(seq, hidden)

    def timed(fn):
        fn()
        return statistics.median([_clock(fn) for _ in range(repeats)])

    matmul = timed(lambda: torch.matmul(h, w.t(), out=z))
    softmax = timed(lambda: torch.softmax(z, dim=-1))
    grad_h = timed(lambda: torch.matmul(z, w, out=dh))
    grad_w = timed(lambda: z.t() @ h)
    floor = 2 * matmul + grad_h + grad_w + 2 * softmax
    return {"matmul_s": matmul, "softmax_s": softmax, "grad_h_s": grad_h, "grad_w_s": grad_w, "floor_s": floor,
            "fp32_gflops": 2 * seq * hidden * vocab / matmul / 1e9}


def _clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cache_bytes(ks=(16, 64, 256), examples: int = 32, length: int = 256, shard_size: int = 16) -> list[dict]:
    """Bytes per stored target of real caches (a tiny Gemma 2 teacher run by build_cache, every
    position of `examples` sequences of `length` tokens targeted, mode "sampled", float16 probs)."""
    import tempfile

    import torch

    from gemma_hf import GemmaHFConfig, GemmaHFForCausalLM
    from gemma_hf.distillation.cache import build_cache
    from gemma_hf.distillation.reader import CacheReader

    torch.manual_seed(0)
    teacher = GemmaHFForCausalLM._from_config(GemmaHFConfig(**{**BODY, "vocab_size": 1024}),
                                              attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    records = [{"input_ids": [2] + torch.randint(3, 1024, (length - 1,), generator=gen).tolist()}
               for _ in range(examples)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text("{}")
        for k in ks:
            directory = Path(tmp) / f"k{k}"
            build_cache(teacher, records, directory, tokenizer=Path(tmp) / "tokenizer.json", K=k,
                        shard_size=shard_size, batch_size=8)
            reader = CacheReader(directory, verify=True)
            m = reader.manifest
            positions, tokens = m["dataset"]["num_positions"], m["dataset"]["num_tokens"]
            total = sum(sh["bytes"] for sh in m["shards"]) + (directory / "manifest.json").stat().st_size
            rows.append({"K": k, "bytes_per_target": total / positions, "targets": 6 * k, "position": 4,
                         "tokens": 4 * tokens / positions,
                         "overhead": (total - positions * (6 * k + 4) - 4 * tokens) / positions,
                         "positions": positions, "shards": len(m["shards"]), "total_bytes": total})
    return rows


WORKERS = {"step": worker_step, "floor": worker_floor}


def _mem_available_gb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def run_worker(kind: str, **kwargs) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({"kind": kind, **kwargs})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {kind} {kwargs} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seq 512, one timed step each")
    parser.add_argument("--seq", type=int, help="sequence length (default 1024; 512 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed steps per implementation (default 2; 1 with --quick)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cache-bytes", action="store_true",
                        help="only measure the offline cache's bytes per stored target for K = 16, 64, 256")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec.pop("kind")](**spec)))
        return 0

    if args.cache_bytes:
        print("offline cache, bytes per stored target (32 sequences x 256 tokens, every position, shards of 16, "
              "ids int32 + probs float16):")
        for r in cache_bytes():
            print(f"  K={r['K']:>3}: {r['bytes_per_target']:7.1f} B = ids+probs {r['targets']} + position "
                  f"{r['position']} + tokens {r['tokens']:.2f} + overhead {r['overhead']:.2f} "
                  f"({r['total_bytes']} bytes, {r['positions']} targets, {r['shards']} shards)")
        return 0

    seq = args.seq or (512 if args.quick else 1024)
    repeats = args.repeats or (1 if args.quick else 2)
    print(f"distillation step, vocab {BODY['vocab_size']}, seq {seq}, hidden {BODY['hidden_size']}, "
          f"{BODY['num_hidden_layers']} layers (student and teacher), beta {BETA}, fp32, {os.cpu_count()} CPUs",
          flush=True)
    # TRL's path holds about 17 [T, V] fp32 tensors at its peak (measured: 19.1 GB at seq 1024).
    need_gb = 18 * seq * BODY["vocab_size"] * 4 / 2**30 + 1
    available_gb = _mem_available_gb()
    if available_gb is not None and available_gb < need_gb:
        print(f"only {available_gb:.1f} GB of memory available, TRL's path needs about {need_gb:.0f} GB at seq "
              f"{seq}: use a shorter --seq.", file=sys.stderr)
        return 1
    # floor, ours, TRL, ours, floor (--quick: floor, ours, TRL): a linear drift in this shared machine's
    # speed biases neither implementation, and TRL's path (slow, ~19 GB at seq 1024) runs once.
    runs = {"ours": [], "trl": [], "floor": []}
    order = ("floor", "ours", "trl") if args.quick else ("floor", "ours", "trl", "ours", "floor")
    for impl in order:
        if impl == "floor":
            result = run_worker("floor", seq=seq, repeats=repeats)
            print(f"floor: {result['floor_s']:.2f} s", flush=True)
        else:
            result = run_worker("step", impl=impl, seq=seq, repeats=repeats)
            print(f"{impl}: steps {', '.join(f'{t:.2f}' for t in result['times'])} s, peak RSS "
                  f"{result['peak_rss_mb']:.0f} MB", flush=True)
        runs[impl].append(result)
    floor = min(runs["floor"], key=lambda r: r["floor_s"])
    ours, trl = ({"time_s": min(t for r in rs for t in r["times"]),
                  "median_s": statistics.median(t for r in rs for t in r["times"]),
                  "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "growth_mb": max(r["growth_mb"] for r in rs),
                  "loss": rs[-1]["loss"], "runs": rs} for rs in (runs["ours"], runs["trl"]))

    rows = [
        ("measurement", "ours", "TRL GKD path", "ours/TRL", ""),
        ("step time (fastest)", f"{ours['time_s']:.2f} s", f"{trl['time_s']:.2f} s",
         f"{ours['time_s'] / trl['time_s']:.2f}x", "lower is better"),
        ("step time (median)", f"{ours['median_s']:.2f} s", f"{trl['median_s']:.2f} s",
         f"{ours['median_s'] / trl['median_s']:.2f}x", "this machine's CPUs are shared: noisy"),
        ("peak RSS", f"{ours['peak_rss_mb']:.0f} MB", f"{trl['peak_rss_mb']:.0f} MB",
         f"{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x", "models included"),
        ("peak RSS growth in the step", f"{ours['growth_mb']:.0f} MB", f"{trl['growth_mb']:.0f} MB",
         f"{ours['growth_mb'] / max(trl['growth_mb'], 1e-9):.2f}x", "over the resident set before it"),
        ("time / floor", f"{ours['time_s'] / floor['floor_s']:.2f}x", f"{trl['time_s'] / floor['floor_s']:.2f}x", "",
         f"floor {floor['floor_s']:.2f} s = 2 x proj {floor['matmul_s']:.2f} + dh {floor['grad_h_s']:.2f} + dW "
         f"{floor['grad_w_s']:.2f} + 2 x softmax {floor['softmax_s']:.2f} ({floor['fp32_gflops']:.0f} GFLOP/s)"),
        ("loss", f"{ours['loss']:.6f}", f"{trl['loss']:.6f}",
         f"rel diff {abs(ours['loss'] - trl['loss']) / abs(trl['loss']):.1e}", "same models, same inputs"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    results = {"seq": seq, "repeats": repeats, "ours": ours, "trl": trl, "floor": floor,
               "time_ratio": ours["time_s"] / trl["time_s"], "rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"]}
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / time.strftime("distill-%Y%m%d-%H%M%S.json")
    for path in [out] + ([args.json] if args.json else []):
        path.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
