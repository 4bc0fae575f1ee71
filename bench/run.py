"""Benchmarks: gemma_hf against stock transformers, identical weights and inputs, side by side.

Every measurement runs in its own subprocess (so peak RSS is that measurement's, read from the
OS via getrusage), timings are the median of several runs after a warm-up, and the table
prints ours / stock ratios. JSON goes to bench/results/<timestamp>.json (and --json PATH).

    python bench/run.py            # full (~20 min on 2 cores): train steps at seq 512/1024/2048, 270M generation and forward
    python bench/run.py --quick    # under 3 minutes: seq 512 only, fewer tokens and repeats
    python bench/run.py --only generate --new-tokens 16 --repeats 2   # decoding only (~15 min on a busy 2-core box)

Measurements (CPU):
- train: one forward+backward with labels, Gemma 2 config (hidden 256, 2 layers, vocab 256000,
  soft-caps 50/30), eager attention, fp32, batch 1.
- floor: the head's unavoidable cost on this machine: three [T x H] x [H x V] matmuls at the
  measured fp32 rate, plus one tanh and one exp pass over [T, V].
- generate: tokens/s of greedy decoding with cache, real Gemma 3 270M, fp32 and bf16, batch 1 and a
  left-padded batch of 8 (ours: GemmaHFForCausalLM; stock: Gemma3ForCausalLM, same weights),
  ABBA; the run fails if ours and stock generate different tokens. Next to it, the decode limit the
  machine's memory bandwidth allows (bandwidth: torch.sum over 1 GiB, measured in the same run, over
  the weight bytes a decoded token reads) and the share of it each side reaches.
- rollout: the policy's generate calls inside TRL RLOO steps (270M, fp32, 4 completions, 3 steps), ours vs
  stock model class in the same trainer setup: rollout tokens/s over the calls after the first (which
  pays one-time warm-up), and the generation's share of the step.
- forward: latency of one 512-token forward, real Gemma 3 270M, fp32.
  Both run ours, stock, stock, ours (four processes) so that drift in machine speed cancels.
- kv cache: bytes the cache holds after an 8k-token prefill with Gemma 2's local/global pattern
  (window 4096), against caching every layer in full.
On a CUDA machine, add --gpu for bf16 train-step throughput, peak GPU memory and MFU of a
Gemma 2 2B-shaped config (flex attention vs stock eager).
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
TRAIN_CONFIG = dict(
    vocab_size=256000, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=4096,
    layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0, max_position_embeddings=8192,
)


# ----------------------------------------------------------------------------- workers
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _train_models(impl: str, seq: int):
    import torch

    torch.manual_seed(0)
    if impl == "ours":
        from gemma_hf import GemmaHFConfig, GemmaHFForCausalLM

        model = GemmaHFForCausalLM._from_config(GemmaHFConfig(family="gemma2", **TRAIN_CONFIG),
                                                attn_implementation="eager")
    else:
        from transformers import Gemma2Config, Gemma2ForCausalLM

        model = Gemma2ForCausalLM._from_config(Gemma2Config(**TRAIN_CONFIG), attn_implementation="eager")
    ids = torch.randint(0, TRAIN_CONFIG["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    return model.train(), ids


def worker_train(impl: str, seq: int, repeats: int) -> dict:
    model, ids = _train_models(impl, seq)
    base_rss = _peak_rss_mb()

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    times = _time(step, repeats)
    return {"time_s": statistics.median(times), "times": times, "peak_rss_mb": _peak_rss_mb(),
            "rss_before_mb": base_rss}


def worker_floor(seq: int, repeats: int) -> dict:
    import torch

    hidden, vocab = TRAIN_CONFIG["hidden_size"], TRAIN_CONFIG["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(seq, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen)
    z = torch.empty(seq, vocab)
    matmul = statistics.median(_time(lambda: torch.matmul(h, w.t(), out=z), repeats))
    tanh = statistics.median(_time(lambda: torch.tanh(z, out=z), repeats))
    z.uniform_(-60.0, 0.0)  # soft-capped logits minus their max: the range exp sees in the loss
    buf = torch.empty_like(z)
    exp = statistics.median(_time(lambda: torch.exp(z, out=buf), repeats))
    gflops = 2 * seq * hidden * vocab / matmul / 1e9
    return {"matmul_s": matmul, "tanh_s": tanh, "exp_s": exp, "fp32_gflops": gflops,
            "floor_s": 3 * matmul + tanh + exp}


def _load_270m(impl: str, dtype_name: str):
    import torch

    from gemma_hf import assets

    path = assets.gemma3_270m()
    dtype = getattr(torch, dtype_name)
    if impl == "ours":
        from gemma_hf import GemmaHFForCausalLM as cls
    else:
        from transformers import Gemma3ForCausalLM as cls
    # Both on their default attention choice would differ (ours: sdpa for Gemma 3); pin eager for both.
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    return model


def _prompts(batch: int):
    """<bos> + a short prompt; for batch > 1, prompts of 3..(3 + 3(batch-1)) tokens, left-padded with 0 as TRL pads."""
    import torch

    text = [2, 818, 5279, 529, 7001, 563, 496, 1535, 3495, 600, 4119, 1401, 529, 506, 1902, 236761, 1030, 580,
            3207, 528, 3879, 236761, 108, 818, 1855, 7488]
    if batch == 1:
        return torch.tensor([text[:6]]), None
    lengths = [3 + 3 * i for i in range(batch)]
    ids = torch.zeros(batch, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, -length:] = torch.tensor(text[:length])
        mask[row, -length:] = 1
    return ids, mask


def worker_generate(impl: str, dtype: str, new_tokens: int, repeats: int, batch: int = 1) -> dict:
    """Greedy decoding tokens/s (new tokens x batch / wall time of the generate call, prefill included).

    impl "ours" (GemmaHFForCausalLM) or "stock" (transformers' Gemma3ForCausalLM). The generated ids come
    back so that the orchestrator checks ours == stock token for token in the same run.
    """
    import torch

    model = _load_270m("stock" if impl == "stock" else "ours", dtype)
    ids, mask = _prompts(batch)

    def run(tokens=new_tokens):
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + tokens
        return out

    run(4)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    result = {"time_s": statistics.median(times), "tokens_per_s": batch * new_tokens / statistics.median(times),
              "times": times, "new_tokens": new_tokens * batch, "peak_rss_mb": _peak_rss_mb(),
              "generated": out[:, ids.shape[1]:].tolist(), "threads": torch.get_num_threads()}
    return result


def worker_bandwidth(repeats: int = 5) -> dict:
    """Memory read bandwidth (GB/s): the best of `repeats` torch.sum passes over 1 GiB of fp32, on torch's
    threads (all cores) and on one thread. The decoding limit is this over the weight bytes read per token."""
    import torch

    buf = torch.ones(1 << 28)  # 1 GiB, far beyond any cache
    out = {}
    for label, threads in (("all_threads", torch.get_num_threads()), ("one_thread", 1)):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        best = min(_time(lambda: buf.sum(), repeats))
        torch.set_num_threads(previous)
        out[f"{label}_gb_s"] = buf.numel() * 4 / best / 1e9
    return out


def _weight_bytes_270m(dtype: str) -> int:
    """Bytes of weights one decoded token reads: every parameter once (the tied embedding/lm_head once)."""
    return 268_098_176 * (4 if dtype == "float32" else 2)


def worker_rollout(impl: str, prompts: int, completion: int, steps: int) -> dict:
    """Generation inside TRL's RLOO step on the real 270M (fp32): tokens/s of the policy's generate calls.

    The same RLOOTrainer setup for both model classes (ours or stock Gemma3ForCausalLM); the policy's
    `generate` is wrapped to time each call and count the completion positions it produced.
    """
    import logging

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from gemma_hf import assets

    logging.disable(logging.WARNING)
    path = assets.gemma3_270m()
    model = _load_270m("stock" if impl == "stock" else "ours", "float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = ["The capital of France is", "Photosynthesis is the process by which plants",
             "def add(a, b):\n    return", "A good night's sleep", "The three primary colours are",
             "Water boils at", "The largest planet in the solar system", "To make tea, first"]
    data = Dataset.from_dict({"prompt": [texts[i % len(texts)] for i in range(prompts * steps)]})
    calls = []
    original = model.generate

    def timed_generate(*args, **kwargs):
        assert not torch.is_autocast_enabled("cpu"), "rollout bench must decode in fp32, not under autocast"
        start = time.perf_counter()
        out = original(*args, **kwargs)
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        calls.append((time.perf_counter() - start, out.shape[0] * (out.shape[1] - prompt.shape[1])))
        return out

    model.generate = timed_generate  # TRL calls unwrap_model_for_generation(model).generate: this object on CPU
    config = RLOOConfig(output_dir="/tmp/gemma_hf_bench_rollout", per_device_train_batch_size=prompts,
                        num_generations=2, max_completion_length=completion, max_steps=steps, beta=0.0,
                        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
                        learning_rate=1e-7, bf16=False)  # TRL defaults bf16=True: CPU autocast, not fp32

    def reward_length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    trainer = RLOOTrainer(model=model, args=config, reward_funcs=reward_length, train_dataset=data,
                          processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    step_time = (time.perf_counter() - start) / steps
    gen_time, tokens = sum(t for t, _ in calls), sum(n for _, n in calls)
    # The first call pays one-time costs (kernel warm-up; ours also checks each new product shape of its
    # row-split decode once): tokens/s is measured over the calls after it, as a longer run sees them.
    warm = calls[1:] or calls
    warm_time, warm_tokens = sum(t for t, _ in warm), sum(n for _, n in warm)
    return {"time_s": warm_time / len(warm), "times": [t for t, _ in calls],
            "tokens_per_s": warm_tokens / warm_time, "tokens": warm_tokens, "warm_time_s": warm_time,
            "generate_calls": len(calls),
            "first_call_tokens_per_s": calls[0][1] / calls[0][0] if calls else None,
            "step_s": step_time, "generate_share_of_step": gen_time / (step_time * steps),
            "peak_rss_mb": _peak_rss_mb()}


def worker_forward(impl: str, seq: int, repeats: int) -> dict:
    import torch

    model = _load_270m(impl, "float32")
    ids = torch.randint(3, 262144, (1, seq), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 2

    def run():
        with torch.no_grad():
            model(ids)

    times = _time(run, repeats)
    return {"time_s": statistics.median(times), "times": times, "peak_rss_mb": _peak_rss_mb()}


def worker_kv_cache(context: int) -> dict:
    """Bytes held by the KV cache after a `context`-token prefill, Gemma 2 layer pattern (local, global)."""
    import torch

    from gemma_hf import GemmaHFConfig, GemmaHFForCausalLM

    config = GemmaHFConfig(family="gemma2", **{**TRAIN_CONFIG, "vocab_size": 1024, "num_hidden_layers": 4,
                                               "layer_types": ["sliding_attention", "full_attention"] * 2})
    model = GemmaHFForCausalLM._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 1024, (1, context), generator=torch.Generator().manual_seed(0))
    cache, step = None, 1024  # chunked prefill keeps eager attention's score matrix small
    with torch.no_grad():
        for start in range(0, context, step):
            cache = model(ids[:, start:start + step], past_key_values=cache, use_cache=True).past_key_values
    held = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers) * 4
    full = config.num_hidden_layers * 2 * config.num_key_value_heads * context * config.head_dim * 4
    return {"cache_bytes": held, "full_cache_bytes": full, "ratio": held / full,
            "window": config.sliding_window, "context": context}


def worker_gpu_train(impl: str, seq: int, repeats: int) -> dict:
    """bf16 train step of a Gemma 2 2B-shaped config on CUDA: tokens/s, peak memory, MFU."""
    import torch

    from gemma_hf import preset_config

    config = preset_config("gemma2-2b", num_hidden_layers=8)
    if impl == "ours":
        from gemma_hf import GemmaHFForCausalLM

        model = GemmaHFForCausalLM._from_config(config, attn_implementation="flex_attention", dtype=torch.bfloat16)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        stock = config.to_stock_dict()
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(stock.pop("model_type"), **stock),
                                                 attn_implementation="eager", dtype=torch.bfloat16)
    model = model.cuda().train()
    ids = torch.randint(0, config.vocab_size, (1, seq), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        torch.cuda.synchronize()

    torch.cuda.reset_peak_memory_stats()
    times = _time(step, repeats)
    t = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    flops = 6 * params * seq  # dense approximation (attention FLOPs not counted)
    peak_tflops = float(os.environ.get("GEMMA_HF_PEAK_TFLOPS", "989"))  # H100 SXM dense bf16
    return {"time_s": t, "tokens_per_s": seq / t, "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "mfu": flops / t / (peak_tflops * 1e12)}


WORKERS = {"train": worker_train, "floor": worker_floor, "generate": worker_generate,
           "bandwidth": worker_bandwidth, "rollout": worker_rollout,
           "forward": worker_forward, "kv_cache": worker_kv_cache, "gpu_train": worker_gpu_train}


# ----------------------------------------------------------------------------- orchestration
def run_worker(kind: str, **kwargs) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps({"kind": kind, **kwargs})]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {kind} {kwargs} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_abba(kind: str, abba: bool = True, **kwargs) -> tuple[dict, dict]:
    """ours, stock, stock, ours: a drift in machine speed (this kind of VM has +-10% swings over
    minutes) then biases neither side. Each side's time is the median over both of its runs.
    With abba=False (--quick): ours, stock once each."""
    runs = {"ours": [], "stock": []}
    for impl in ("ours", "stock", "stock", "ours") if abba else ("ours", "stock"):
        runs[impl].append(run_worker(kind, impl=impl, **kwargs))
    merged = {}
    for impl, results in runs.items():
        times = [t for r in results for t in r["times"]]
        merged[impl] = {"time_s": statistics.median(times), "times": times,
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in results)}
        if "new_tokens" in results[0]:
            merged[impl]["tokens_per_s"] = results[0]["new_tokens"] / merged[impl]["time_s"]
            merged[impl]["tokens_per_s_runs"] = [r["tokens_per_s"] for r in results]
        if "tokens" in results[0]:  # rollout: the warm generate calls of both runs together
            merged[impl]["tokens_per_s"] = (sum(r["tokens"] for r in results)
                                            / sum(r["warm_time_s"] for r in results))
            merged[impl]["step_s"] = statistics.median(r["step_s"] for r in results)
            merged[impl]["generate_share_of_step"] = statistics.mean(r["generate_share_of_step"] for r in results)
        if "generated" in results[0]:
            merged[impl]["generated"] = [r["generated"] for r in results]
    return merged["ours"], merged["stock"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seq 512 only, fewer tokens and repeats (< 3 min)")
    parser.add_argument("--gpu", action="store_true", help="also run the CUDA bf16 train-step benchmark")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", default="train,generate,rollout,forward,kv_cache",
                        help="comma-separated sections to run (default: all CPU sections)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per call (default 64, --quick 16)")
    parser.add_argument("--repeats", type=int, help="timed repeats per process (default 3, --quick 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec.pop("kind")](**spec)))
        return 0

    seqs = [512] if args.quick else [512, 1024, 2048]
    repeats = 2 if args.quick else 3
    new_tokens = args.new_tokens or (16 if args.quick else 64)
    repeats = args.repeats or repeats
    rows, results = [], {"quick": args.quick, "threads": os.cpu_count(), "train": {}, "generate": {},
                         "load_at_start": os.getloadavg()}

    def ratio_row(name, ours, stock, key, unit, lower_is_better=True):
        r = ours[key] / stock[key]
        rows.append((name, f"{ours[key]:.3g} {unit}", f"{stock[key]:.3g} {unit}", f"{r:.2f}x",
                     "lower is better" if lower_is_better else "higher is better"))
        print(" | ".join(rows[-1]), flush=True)  # progress: a long run killed midway keeps its rows
        return r

    sections = set(args.only.split(","))
    unknown = sections - {"train", "generate", "rollout", "forward", "kv_cache"}
    if unknown:
        parser.error(f"--only: unknown section(s) {sorted(unknown)}; "
                     "choose from train, generate, rollout, forward, kv_cache")

    for seq in (seqs if "train" in sections else []):
        ours = run_worker("train", impl="ours", seq=seq, repeats=repeats)
        stock = run_worker("train", impl="stock", seq=seq, repeats=repeats)
        floor = run_worker("floor", seq=seq, repeats=repeats)
        results["train"][seq] = {"ours": ours, "stock": stock, "floor": floor,
                                 "time_ratio": ratio_row(f"train step seq {seq}: time", ours, stock, "time_s", "s"),
                                 "memory_ratio": ratio_row(f"train step seq {seq}: peak RSS", ours, stock,
                                                           "peak_rss_mb", "MB"),
                                 "ours_over_floor": ours["time_s"] / floor["floor_s"]}
        rows.append((f"  head floor seq {seq}", f"{floor['floor_s']:.3g} s", "", 
                     f"ours/floor {ours['time_s'] / floor['floor_s']:.2f}x",
                     f"matmul {floor['matmul_s']:.2f}s ({floor['fp32_gflops']:.0f} GFLOP/s), "
                     f"tanh {floor['tanh_s']:.2f}s, exp {floor['exp_s']:.2f}s"))
        print(" | ".join(rows[-1]), flush=True)

    if "generate" in sections:
        results["load_before_generate"] = os.getloadavg()
        bandwidth = run_worker("bandwidth")
        results["bandwidth"] = bandwidth
        rows.append(("memory read bandwidth (torch.sum, 1 GiB)",
                     f"{bandwidth['all_threads_gb_s']:.1f} GB/s all threads",
                     f"{bandwidth['one_thread_gb_s']:.1f} GB/s one thread", "", f"load {os.getloadavg()[0]:.1f}"))
        print(" | ".join(rows[-1]), flush=True)
    for dtype in (("float32", "bfloat16") if "generate" in sections else ()):
        for batch in (1, 8):
            # ours, stock, stock, ours (ABBA); stock is transformers' Gemma3ForCausalLM
            ours, stock = run_abba("generate", abba=not args.quick, dtype=dtype, new_tokens=new_tokens,
                                   repeats=repeats, batch=batch)
            identical = all(g == stock["generated"][0] for g in ours["generated"] + stock["generated"])
            limit = bandwidth["all_threads_gb_s"] * 1e9 / _weight_bytes_270m(dtype)  # tokens/s per sequence
            results["generate"][f"{dtype}_batch{batch}"] = {
                "ours": ours, "stock": stock, "greedy_tokens_identical": identical,
                "bandwidth_limit_steps_per_s": limit, "ours_of_limit": ours["tokens_per_s"] / batch / limit,
                "stock_of_limit": stock["tokens_per_s"] / batch / limit,
                "ratio": ratio_row(f"generate 270M {dtype} batch {batch}: tokens/s", ours, stock, "tokens_per_s",
                                   "tok/s", lower_is_better=False)}
            rows.append((f"  decode steps/s vs bandwidth limit {limit:.1f}/s",
                         f"{ours['tokens_per_s'] / batch / limit:.2f}x",
                         f"{stock['tokens_per_s'] / batch / limit:.2f}x", "",
                         f"greedy tokens identical: {identical}; load {os.getloadavg()[0]:.1f}"))
            print(" | ".join(rows[-1]), flush=True)
            if not identical:
                raise SystemExit(f"generate {dtype} batch {batch}: ours and stock generated different tokens")

    if "rollout" in sections:
        ours, stock = run_abba("rollout", abba=not args.quick, prompts=4, completion=new_tokens // 2, steps=3)
        results["rollout"] = {"ours": ours, "stock": stock, "ratio": ratio_row(
            "RLOO step (270M fp32): rollout tokens/s", ours, stock, "tokens_per_s", "tok/s", lower_is_better=False)}
        for impl, r in (("ours", ours), ("stock", stock)):
            rows.append((f"  RLOO step, {impl}", f"{r['step_s']:.1f} s/step", "",
                         f"generate {r['generate_share_of_step']:.0%} of the step", f"load {os.getloadavg()[0]:.1f}"))
            print(" | ".join(rows[-1]), flush=True)

    if "forward" in sections:
        ours, stock = run_abba("forward", abba=not args.quick, seq=512, repeats=repeats)
        results["forward_512"] = {"ours": ours, "stock": stock,
                                  "ratio": ratio_row("forward 270M seq 512: time", ours, stock, "time_s", "s")}

    if "kv_cache" in sections:
        kv = run_worker("kv_cache", context=8192)
        results["kv_cache_8k"] = kv
        rows.append(("KV cache at 8k context (Gemma 2 pattern)", f"{kv['cache_bytes'] / 2**20:.0f} MiB",
                     f"full caching {kv['full_cache_bytes'] / 2**20:.0f} MiB", f"{kv['ratio']:.2f}x of full",
                     f"sliding layers keep {kv['window']} keys"))

    if args.gpu:
        for seq in (2048, 8192):
            ours = run_worker("gpu_train", impl="ours", seq=seq, repeats=5)
            stock = run_worker("gpu_train", impl="stock", seq=seq, repeats=5)
            results.setdefault("gpu_train", {})[seq] = {"ours": ours, "stock": stock}
            ratio_row(f"GPU bf16 train seq {seq}: tokens/s", ours, stock, "tokens_per_s", "tok/s", False)
            ratio_row(f"GPU bf16 train seq {seq}: peak mem", ours, stock, "peak_gpu_mem_gb", "GB")
            rows.append((f"  MFU seq {seq}", f"{ours['mfu']:.1%}", f"{stock['mfu']:.1%}", "", ""))

    widths = [max(len(str(r[i])) for r in rows + [("measurement", "ours", "stock", "ours/stock", "")])
              for i in range(5)]
    header = ("measurement", "ours", "stock", "ours/stock", "")
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())

    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / time.strftime("%Y%m%d-%H%M%S.json")
    for path in [out] + ([args.json] if args.json else []):
        path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
