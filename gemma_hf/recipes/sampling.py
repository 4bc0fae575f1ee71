"""Answering chat prompts with a Gemma model: the family's chat format, stopping at <end_of_turn>.

Used by the recipes (sample answers before/after training), ``gemma-hf chat``/``generate`` and the
demo, so all of them format and stop the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma_hf.chat import END_OF_TURN, encode_chat, stop_token_ids


@dataclass
class Reply:
    text: str  # the answer, without the stop token
    new_tokens: int  # generated tokens, including the stop token when there is one
    stop: str  # "end_of_turn", "eos" or "length" (ran out of max_new_tokens)
    seconds: float

    def to_dict(self) -> dict:
        return {"text": self.text, "new_tokens": self.new_tokens, "stop": self.stop, "seconds": round(self.seconds, 3)}


def model_family(model_dir: str | Path) -> str:
    """The chat family of a checkpoint directory, from its config.json (ours or a stock Gemma one)."""
    from .config import GEMMA_MODEL_TYPES

    config = json.loads((Path(model_dir) / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type == "gemma_hf":
        return config["family"]
    if model_type in GEMMA_MODEL_TYPES:
        return GEMMA_MODEL_TYPES[model_type]
    raise ValueError(f"{model_dir} holds a {model_type!r} model, not a Gemma one")


def load_chat_model(model_dir: str | Path, dtype: str = "float32", tokenizer_dir: str | Path | None = None):
    """(model, tokenizer, family) for chatting with a checkpoint directory."""
    from transformers import AutoTokenizer

    from gemma_hf import GemmaHFForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    family = model_family(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
    model = GemmaHFForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
    return model, tokenizer, family


@torch.no_grad()
def chat_reply(
    model,
    tokenizer,
    messages: list[dict],
    family: str,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    streamer=None,
) -> Reply:
    """Generate the next model turn of ``messages`` (greedy when temperature is 0)."""
    import time

    input_ids = encode_chat(tokenizer, messages, family, add_generation_prompt=True)
    stops = stop_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    ids = torch.tensor([input_ids], device=model.device)
    sampling = temperature > 0
    kwargs = dict(do_sample=sampling, temperature=temperature, top_p=top_p) if sampling else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)
    start = time.perf_counter()
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
        **kwargs,
    )
    seconds = time.perf_counter() - start
    if was_training:
        model.train()
    new = output[0, len(input_ids):].tolist()
    stop = "length"
    if new and new[-1] in stops:
        stop = "end_of_turn" if tokenizer.convert_ids_to_tokens(new[-1]) == END_OF_TURN else "eos"
        body = new[:-1]
    else:
        body = new
    text = tokenizer.decode(body, skip_special_tokens=False)
    # Special tokens inside an answer (a base model's stray <start_of_turn>, ...) are shown as text.
    return Reply(text=text.strip(), new_tokens=len(new), stop=stop, seconds=seconds)


def answer_prompts(model, tokenizer, prompts: list[str], family: str, max_new_tokens: int) -> list[Reply]:
    return [chat_reply(model, tokenizer, [{"role": "user", "content": p}], family, max_new_tokens=max_new_tokens)
            for p in prompts]


__all__ = ["Reply", "model_family", "load_chat_model", "chat_reply", "answer_prompts"]
