"""Answering chat prompts with a Gemma model: the family's chat format, stopping at <end_of_turn>.

Used by the recipes (sample answers before/after training), ``gemma-hf chat``/``generate`` and the
demo, so all of them format and stop the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma_hf.chat import END_OF_TURN, encode_chat, stop_token_ids
from gemma_hf.errors import InputError
from gemma_hf.references import CAUSAL_LM, WrongHead, check_head

log = logging.getLogger(__name__)


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
    from gemma_hf.model.configuration import STOCK_MODEL_TYPES

    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path}: {err}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type == "gemma_hf" and config.get("family") in ("gemma", "gemma2", "gemma3"):
        return config["family"]
    if model_type in STOCK_MODEL_TYPES:
        return STOCK_MODEL_TYPES[model_type]
    raise InputError(f"{model_dir} holds a {model_type!r} model, not a Gemma one (config.json model_type must be "
                     f"gemma_hf, {', '.join(STOCK_MODEL_TYPES)})")


def load_chat_model(model_dir: str | Path, dtype: str = "float32", tokenizer_dir: str | Path | None = None,
                    role: str = "chat model"):
    """(model, tokenizer, family) for chatting with a checkpoint directory; InputError (naming the
    file and the fix) for a directory that is not a whole Gemma causal LM (``role`` names what the
    model is for in that message: "chat model", "judge", ...)."""
    from transformers import AutoTokenizer

    from gemma_hf import GemmaHFForCausalLM

    from .rundir import model_files_complete, safetensors_complete, weight_files

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        adapter = (model_dir / "adapter_config.json").is_file()
        raise InputError(f"{model_dir} is not a model directory (no config.json"
                         + ("; it holds a LoRA adapter only: merge it, or use a run with merge_lora: true)" if adapter
                            else ")"))
    try:  # a reward model loads as a causal LM without a word (its score head dropped, lm_head tied): refuse it
        check_head(str(model_dir), role, CAUSAL_LM)
    except WrongHead as err:
        raise InputError(f"{err.message}; {err.fix}") from None
    family = model_family(model_dir)
    files = [f for f in weight_files(model_dir) if f.endswith(".safetensors")]
    if not files:
        raise InputError(f"{model_dir} has no safetensors weights (model.safetensors or an index and its shards)")
    if not model_files_complete(model_dir):
        broken = [f for f in files if not (model_dir / f).is_file() or not safetensors_complete(model_dir / f)]
        raise InputError(f"{model_dir}: {', '.join(broken)} {'is' if len(broken) == 1 else 'are'} missing, truncated "
                         "or corrupt (not a whole safetensors file); re-save or re-download the checkpoint")
    tokenizer_path = Path(tokenizer_dir) if tokenizer_dir is not None else model_dir
    if not tokenizer_path.is_dir() or not any((tokenizer_path / n).is_file()
                                              for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise InputError(f"no tokenizer in {tokenizer_path} (tokenizer.json / tokenizer.model)"
                         + ("; pass --tokenizer DIR" if tokenizer_dir is None else ""))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    try:
        model = GemmaHFForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
    except (ValueError, TypeError, KeyError) as err:  # a config.json with wrong types or missing fields, mismatches
        raise InputError(f"cannot load {model_dir}: {err}") from None
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

    try:
        input_ids = encode_chat(tokenizer, messages, family, add_generation_prompt=True)
    except (ValueError, TypeError) as err:  # not a Gemma conversation (roles, contents)
        raise InputError(f"cannot format the conversation: {err}") from None
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and len(input_ids) >= context:
        raise InputError(f"the prompt is {len(input_ids)} tokens, and the model's context holds {context}: no room to "
                         "answer. Shorten the prompt (or /reset a long conversation).")
    if context is not None and len(input_ids) + max_new_tokens > context:
        log.warning("at most %d new tokens fit in the model's context of %d after this %d-token prompt",
                    context - len(input_ids), context, len(input_ids))
        max_new_tokens = context - len(input_ids)
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
