"""`gemma-hf chat` (interactive) and `gemma-hf generate` (one-shot): talk to a checkpoint with its
family's chat format, stopping at <end_of_turn> (or <eos>).

`gemma-hf generate --config R.yaml` is the recipe form: a generate run (gemma_hf.recipes.generate: a
teacher's answers to a dataset's prompts as SFT data, with provenance, filters and a manifest)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .recipes import add_recipe_options, recipe_form


# The one-shot options' defaults. `gemma-hf generate` parses them as None, so that one given together with
# --config (the recipe form) is told from one left out; the one-shot form fills these in.
ONE_SHOT_DEFAULTS = {"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "seed": 0, "dtype": "float32"}
# The one-shot options given with --config, as the recipe keys they set (`--config R.yaml --temperature 0.7`).
RECIPE_KEYS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
               "dtype": "dtype", "tokenizer": "tokenizer_name_or_path"}
# One-shot options with no recipe key: refused with --config.
ONE_SHOT_ONLY = {"model_dir": "MODEL_DIR", "prompt": "--prompt", "json": "--json", "system": "--system",
                 "family": "--family"}

GENERATE_DESCRIPTION = """\
Two forms:

  gemma-hf generate MODEL_DIR --prompt TEXT [--prompt TEXT ...]
      Answer each --prompt as a fresh one-turn conversation in the model's chat format (stops at
      <end_of_turn>) and print the answers.

  gemma-hf generate --config R.yaml [--resume] [--key value ...]
      Teacher-written SFT data as a run: the teacher (model_name_or_path) answers the prompts of
      the recipe's datasets, sampled, batched and resumable by shard, into OUTPUT_DIR/conversations.jsonl
      with provenance per record, a manifest (generation.json) and optional filters. A later recipe
      trains on it with datasets: [{path: OUTPUT_DIR}]. --help-keys lists the recipe keys.
      --max-new-tokens, --temperature, --top-p, --seed, --dtype and --tokenizer set the recipe keys of
      the same meaning.
"""


def _common(parser: argparse.ArgumentParser, model_dir: bool = True, defaults: bool = True) -> None:
    """The options of chat and generate; ``model_dir``: with the positional MODEL_DIR (optional when not
    ``defaults``: generate's recipe form has none); ``defaults``: argparse fills in ONE_SHOT_DEFAULTS."""
    def default(key: str):
        return ONE_SHOT_DEFAULTS[key] if defaults else None

    if model_dir:
        parser.add_argument("model_dir", metavar="MODEL_DIR", nargs=None if defaults else "?",
                            help="a checkpoint directory (a run's output_dir, or any gemma_hf / stock Gemma checkpoint)")
    parser.add_argument("--max-new-tokens", type=int, default=default("max_new_tokens"),
                        help="most new tokens per answer (default: 256)")
    parser.add_argument("--temperature", type=float, default=default("temperature"),
                        help="0 (default) decodes greedily; >0 samples")
    parser.add_argument("--top-p", type=float, default=default("top_p"), help="nucleus sampling threshold when sampling")
    parser.add_argument("--seed", type=int, default=default("seed"), help="sampling seed (default: 0)")
    parser.add_argument("--system", help="a system prompt (Gemma folds it into the first user turn)")
    parser.add_argument("--family", choices=["gemma", "gemma2", "gemma3"],
                        help="chat format (default: the checkpoint's family)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=default("dtype"),
                        help="weights dtype (default: float32)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL_DIR)")


def _generate_options(parser: argparse.ArgumentParser, model_dir: bool) -> None:
    _common(parser, model_dir=model_dir, defaults=False)
    parser.add_argument("--prompt", action="append",
                        help="the user message (repeat for several prompts; '-' reads it from standard input)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt: prompt, text, stop, new_tokens, seconds")
    add_recipe_options(parser, "generate")
    parser.set_defaults(func=generate_command, model_dir=None)


def _is_recipe_form(words: list[str]) -> bool:
    return any(w in ("--config", "--help-keys") or w.startswith("--config=") for w in words)


def _parse_recipe_form_apart(generate: argparse.ArgumentParser, recipe_form: argparse.ArgumentParser) -> None:
    """Parse `generate --config ...` with ``recipe_form`` (no MODEL_DIR): with the optional positional, argparse
    would take the value of the first recipe override (`--output_dir runs/x`) for MODEL_DIR."""
    one_shot = generate.parse_known_args

    def parse_known_args(args=None, namespace=None):
        words = list(sys.argv[1:] if args is None else args)
        if _is_recipe_form(words):
            return recipe_form.parse_known_args(words, namespace)
        return one_shot(args, namespace)

    generate.parse_known_args = parse_known_args  # type: ignore[method-assign]


def register(subparsers) -> None:
    chat = subparsers.add_parser(
        "chat", help="chat with a model interactively",
        description="Chat with a Gemma checkpoint in the terminal. Commands: /reset (forget the conversation), "
                    "/exit (or Ctrl-D). Answers stream as they are generated and stop at <end_of_turn>.")
    _common(chat)
    chat.set_defaults(func=chat_command)

    generate = subparsers.add_parser(
        "generate", help="answer prompts once (MODEL_DIR --prompt), or write teacher SFT data (--config R.yaml)",
        description=GENERATE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _generate_options(generate, model_dir=True)
    recipe_form = argparse.ArgumentParser(prog=generate.prog, add_help=False)
    _generate_options(recipe_form, model_dir=False)
    _parse_recipe_form_apart(generate, recipe_form)


def _load(args):
    import torch

    from gemma_hf.sampling import load_chat_model

    torch.manual_seed(args.seed)
    model, tokenizer, family = load_chat_model(args.model_dir, dtype=args.dtype, tokenizer_dir=args.tokenizer)
    return model, tokenizer, args.family or family


def _check_args(args) -> str | None:
    import math

    if args.max_new_tokens < 1:
        return "--max-new-tokens must be 1 or more"
    if not math.isfinite(args.temperature) or args.temperature < 0:
        return f"--temperature must be a finite number, 0 (greedy) or more, not {args.temperature}"
    if not math.isfinite(args.top_p) or not 0 < args.top_p <= 1:
        return f"--top-p must be in (0, 1] (1 keeps every token), not {args.top_p}"
    if args.seed < 0:
        return f"--seed must be 0 or more, not {args.seed}"
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        return f"--tokenizer {args.tokenizer} is not a directory"
    return None


def _start(messages: list[dict], system: str | None, text: str) -> list[dict]:
    if not messages and system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text})
    return messages


def _checked_load(args: argparse.Namespace):
    """(model, tokenizer, family); InputError (exit 2) when the arguments are unusable."""
    from gemma_hf.errors import InputError

    problem = _check_args(args)
    if problem:
        raise InputError(problem)
    return _load(args)


def _as_overrides(args: argparse.Namespace) -> list[str]:
    """The one-shot options given with --config, as recipe overrides; those with no recipe key are refused."""
    from gemma_hf.errors import InputError

    given = [flag for key, flag in ONE_SHOT_ONLY.items() if getattr(args, key, None)]
    if given:
        raise InputError(f"{', '.join(given)} belong{'s' if len(given) == 1 else ''} to the one-shot form (gemma-hf "
                         "generate MODEL_DIR --prompt TEXT); a recipe (--config) names its teacher in "
                         "model_name_or_path and its prompts in datasets: remove them, or drop --config")
    out: list[str] = []
    for option, key in RECIPE_KEYS.items():
        value = getattr(args, option, None)
        if value is not None:
            out += [f"--{key}", str(value)]
    return out


def generate_command(args: argparse.Namespace) -> int:
    from gemma_hf.errors import InputError

    code = recipe_form(args, "generate", _as_overrides)  # the recipe form: a generate run (recipes.generate)
    if code is not None:
        return code
    if args.model_dir is None or not args.prompt:
        missing = " and ".join(n for n, v in (("MODEL_DIR", args.model_dir), ("--prompt", args.prompt)) if not v)
        raise InputError(f"gemma-hf generate needs {missing} (the one-shot form), or --config RECIPE.yaml (a "
                         "generate run): see gemma-hf generate --help")
    for key, value in ONE_SHOT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    loaded = _checked_load(args)
    from gemma_hf.sampling import chat_reply

    model, tokenizer, family = loaded
    for prompt in args.prompt:
        if prompt == "-":
            prompt = sys.stdin.read()
        messages = _start([], args.system, prompt)
        reply = chat_reply(model, tokenizer, messages, family, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p)
        if args.json:
            print(json.dumps({"prompt": prompt, **reply.to_dict()}, ensure_ascii=False), flush=True)
        else:
            print(reply.text)
            if reply.stop == "length":
                print(f"[stopped after --max-new-tokens {args.max_new_tokens} without ending the turn]", file=sys.stderr)
    return 0


def chat_command(args: argparse.Namespace) -> int:
    loaded = _checked_load(args)
    from transformers import TextStreamer

    from gemma_hf.errors import InputError
    from gemma_hf.sampling import chat_reply

    model, tokenizer, family = loaded
    interactive = sys.stdin.isatty()
    print(f"chatting with {args.model_dir} ({family} chat format). /reset forgets, /exit quits.", flush=True)
    messages: list[dict] = []
    while True:
        try:
            text = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = text.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = []
            print("(conversation reset)", flush=True)
            continue
        _start(messages, args.system, text)
        print("model> ", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            reply = chat_reply(model, tokenizer, messages, family, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, streamer=streamer)
        except InputError as err:  # e.g. the conversation outgrew the model's context
            print(f"\n[{err}] (the message was not added; /reset starts over)", flush=True)
            messages.pop()
            continue
        if reply.stop == "length":
            print(f"[stopped after --max-new-tokens {args.max_new_tokens} without ending the turn]", flush=True)
        messages.append({"role": "assistant", "content": reply.text})
