"""`make demo`: turn the real Gemma 3 270M base model into a chat model on this CPU, and show it.

Runs recipes/gemma3-270m/sft.yaml through the same code as `gemma-hf sft` (LoRA on Alpaca
records, 24 held out), then prints what changed: the held-out loss before and after, and the
same three chat prompts answered before and after (greedy, at most 64 new tokens, stopping at
<end_of_turn>). The base model has never been taught the turn format; after SFT it answers and
ends its turn. Finally the saved run directory is reloaded and asked the first prompt again.

    python -m gemma_hf.demo [--output-dir DIR] [--max-steps N]
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "gemma3-270m" / "sft.yaml"


def _show(reply: dict) -> str:
    text = reply["text"].replace("\n", "\n       ") if reply["text"] else "(nothing)"
    how = {"end_of_turn": "ended its turn with <end_of_turn>", "eos": "stopped with <eos>",
           "length": f"did NOT end its turn within {reply['new_tokens']} tokens"}[reply["stop"]]
    return f"{text}\n       [{how}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_hf.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(RECIPE), help="the recipe to run (default: %(default)s)")
    parser.add_argument("--output-dir", help="run directory (default: runs/demo-gemma3-270m-sft-<time>)")
    parser.add_argument("--max-steps", type=int, help="override the recipe's max_steps")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the local asset cache
    start = time.time()
    from gemma_hf.recipes.config import RecipeError, load_recipe
    from gemma_hf.recipes.engine import run_recipe
    from gemma_hf.recipes.sampling import chat_reply, load_chat_model

    output_dir = args.output_dir or f"runs/demo-gemma3-270m-sft-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = ["--output_dir", output_dir]
    if args.max_steps:
        overrides += ["--max_steps", str(args.max_steps)]
    print(f"== gemma_hf demo: SFT of the real Gemma 3 270M base model on this CPU ==\nrecipe: {args.recipe}\n", flush=True)
    try:
        recipe = load_recipe(args.recipe, overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if recipe.environment_problems:
        print("error: this machine cannot run the demo:\n" + "\n".join(p.render() for p in recipe.environment_problems),
              file=sys.stderr)
        return 2
    t = recipe.training
    print(f"model {recipe.model_path} ({recipe.family}); LoRA r={recipe.model.lora_r} on all linear layers; "
          f"{t.max_steps} steps x {t.per_device_train_batch_size} examples, lr {t.learning_rate:g}, max_length "
          f"{t.max_length}\n", flush=True)

    result = run_recipe(recipe)

    print("\n" + "=" * 100)
    print(f"Run directory: {result.output_dir}  ({result.global_step} steps, {result.wall_time_s:.0f}s)")
    if result.eval_loss_before is not None:
        print(f"Held-out loss (24 Alpaca records, model-turn tokens): {result.eval_loss_before:.3f} before -> "
              f"{result.eval_loss_after:.3f} after")
    for number, sample in enumerate(result.samples, 1):
        print(f"\n[{number}] user: {sample['prompt']}")
        print(f"  before: {_show(sample['before'])}")
        print(f"  after:  {_show(sample['after'])}")

    # The saved artefact, as a user would load it: `gemma-hf chat <output_dir>` does the same.
    if result.samples:
        model, tokenizer, family = load_chat_model(result.output_dir)
        first = result.samples[0]
        reply = chat_reply(model, tokenizer, [{"role": "user", "content": first["prompt"]}], family,
                           max_new_tokens=recipe.method_args.sample_max_new_tokens)
        same = "the same answer" if reply.text == first["after"]["text"] else "a different answer (merged-weight rounding)"
        print(f"\nReloaded {result.output_dir} (merged LoRA, {family} chat format): prompt 1 -> {same}; "
              f"stop: {reply.stop}")
    print(textwrap.dedent(f"""
        Try it:  gemma-hf chat {result.output_dir}
                 gemma-hf generate {result.output_dir} --prompt "Give me a synonym for happy."
        Artefacts: recipe.yaml, model.safetensors (+ adapter/), metrics.jsonl, plots/loss.png, run.json, eval.json
        Total demo time: {time.time() - start:.0f}s"""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
