"""`make demo`: load the real Gemma 3 270M through gemma_hf's classes and complete a few prompts.

The weights come from the package registries (see gemma_hf.assets) and are cached outside the
repo. Prints each completion and the decoding speed (new tokens per second, greedy, KV cache).
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):",
    "The capital of France is",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from gemma_hf import GemmaHFForCausalLM, assets

    checkpoint = assets.gemma3_270m()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    start = time.perf_counter()
    model = GemmaHFForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, args.dtype)).eval()
    print(f"Loaded {checkpoint} into {type(model).__name__} ({model.num_parameters():,} parameters, "
          f"family={model.config.family}, attention={model.config._attn_implementation}, "
          f"{args.dtype}) in {time.perf_counter() - start:.1f}s\n")

    total_new, total_time = 0, 0.0
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
        new = out.shape[1] - inputs["input_ids"].shape[1]
        total_new, total_time = total_new + new, total_time + elapsed
        completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f">>> {prompt}{completion}\n    [{new} tokens, {new / elapsed:.1f} tokens/s]\n")
    print(f"Overall: {total_new} new tokens in {total_time:.1f}s = {total_new / total_time:.1f} tokens/s "
          f"(greedy, batch 1, {torch.get_num_threads()} CPU threads)")


if __name__ == "__main__":
    main()
