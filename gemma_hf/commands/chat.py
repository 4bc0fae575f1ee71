"""`gemma-hf chat` (interactive) and `gemma-hf generate` (one-shot): talk to a checkpoint with its
family's chat format, stopping at <end_of_turn> (or <eos>)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="a checkpoint directory (a run's output_dir, or any gemma_hf / stock Gemma checkpoint)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens per answer (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily; >0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold when sampling")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--system", help="a system prompt (Gemma folds it into the first user turn)")
    parser.add_argument("--family", choices=["gemma", "gemma2", "gemma3"],
                        help="chat format (default: the checkpoint's family)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights dtype (default: float32)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL_DIR)")


def register(subparsers) -> None:
    chat = subparsers.add_parser(
        "chat", help="chat with a model interactively",
        description="Chat with a Gemma checkpoint in the terminal. Commands: /reset (forget the conversation), "
                    "/exit (or Ctrl-D). Answers stream as they are generated and stop at <end_of_turn>.")
    _common(chat)
    chat.set_defaults(func=chat_command)

    generate = subparsers.add_parser(
        "generate", help="answer one or more prompts and exit",
        description="Answer each --prompt as a fresh one-turn conversation in the model's chat format; "
                    "stops at <end_of_turn>.")
    _common(generate)
    generate.add_argument("--prompt", action="append", required=True,
                          help="the user message (repeat for several prompts; '-' reads it from standard input)")
    generate.add_argument("--json", action="store_true",
                          help="print one JSON object per prompt: prompt, text, stop, new_tokens, seconds")
    generate.set_defaults(func=generate_command)


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


def generate_command(args: argparse.Namespace) -> int:
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
