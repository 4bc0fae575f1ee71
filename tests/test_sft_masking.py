"""Assistant-only loss masks on the real Gemma 1/2 tokenizer: exactly the model turns' tokens."""

from __future__ import annotations

import pytest

from gemma_hf.assets import gemma_tokenizer
from gemma_hf.chat import encode_chat
from gemma_hf.tokenization import encode_with_assistant_mask
from tests.assets import tokenizer as load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Knock knock."},
    {"role": "assistant", "content": "Who's there?"},
    {"role": "user", "content": "Gemma."},
    {"role": "assistant", "content": "Gemma who?\n\nI give up."},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(gemma_tokenizer)


def masked_pieces(tok, ids, mask):
    """The maximal runs of masked tokens, decoded with special tokens kept."""
    runs, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_mask_covers_exactly_the_model_turns(tok, family):
    ids, mask = encode_with_assistant_mask(tok, CONVERSATION, family)
    assert ids == encode_chat(tok, CONVERSATION, family)  # the same ids inference sees
    assert len(mask) == len(ids) and set(mask) <= {0, 1}
    final = "Gemma who?\n\nI give up.<end_of_turn>" + ("<eos>" if family == "gemma2" else "")
    assert masked_pieces(tok, ids, mask) == ["Who's there?<end_of_turn>", final]
    # Context only: <bos>, headers, user turns, the newline after every <end_of_turn>.
    eot, eos, bos = (tok.convert_tokens_to_ids(t) for t in ("<end_of_turn>", "<eos>", "<bos>"))
    assert mask[ids.index(bos)] == 0
    eot_positions = [i for i, t in enumerate(ids) if t == eot]
    assert [mask[i] for i in eot_positions] == [0, 1, 0, 1]  # user turns' <end_of_turn> are context
    if family == "gemma2":
        assert ids[-1] == eos and mask[-1] == 1  # Table 5: the final model turn ends <end_of_turn><eos>
    else:
        assert ids[-1] != eos and mask[-1] == 0  # Gemma 1: "<end_of_turn>\n", the newline is context
    # Token-level equality with an independent construction: mask bits count the model tokens.
    expected = len(tok("Who's there?", add_special_tokens=False)["input_ids"]) + 1
    expected += len(tok("Gemma who?\n\nI give up.", add_special_tokens=False)["input_ids"]) + 1
    expected += family == "gemma2"
    assert sum(mask) == expected


def test_mask_on_alpaca_records_real_tokenizer(tok):
    import json

    from gemma_hf.assets import llamafactory_data
    from gemma_hf.recipes.formats import to_conversation
    from tests.assets import require

    records = json.loads((require(llamafactory_data) / "alpaca_en_demo.json").read_text())[:200]
    eot, eos = tok.convert_tokens_to_ids("<end_of_turn>"), tok.convert_tokens_to_ids("<eos>")
    for record in records:
        messages = to_conversation(record, "alpaca")["messages"]
        ids, mask = encode_with_assistant_mask(tok, messages, "gemma2")
        answer = tok(messages[1]["content"].strip(), add_special_tokens=False)["input_ids"]
        assert sum(mask) == len(answer) + 2
        start = mask.index(1)
        assert ids[start:start + len(answer)] == answer
        assert ids[-2:] == [eot, eos] and mask[-2:] == [1, 1] and mask[start - 1] == 0


def test_control_tokens_in_text_are_refused(tok):
    with pytest.raises(ValueError, match="control token '<end_of_turn>'"):
        encode_with_assistant_mask(tok, [{"role": "user", "content": "hi<end_of_turn>"},
                                         {"role": "assistant", "content": "x"}], "gemma2")
    with pytest.raises(ValueError, match="<bos>"):
        encode_with_assistant_mask(tok, [{"role": "user", "content": "a <bos> b"},
                                         {"role": "assistant", "content": "x"}], "gemma2")


def test_prepared_dataset_labels_follow_the_mask(tok):
    """Through TRL's preparation (pre-tokenized input_ids + assistant_masks -> labels)."""
    from datasets import Dataset

    from gemma_hf import GemmaHFForCausalLM
    from gemma_hf.recipes.config import load_recipe
    from gemma_hf.recipes.runtime import Run
    from gemma_hf.rundir import RunDir
    from gemma_hf.recipes.sft import METHOD, _trainer_class
    from tests.tiny import tiny_config

    recipe = load_recipe("recipes/tiny/sft.yaml", ["--output_dir", "/nonexistent/never-written", "--eval_strategy", "no"])
    run = Run(recipe, METHOD, RunDir(recipe.output_dir), state=None, tokenizer=tok)
    tokenized, _ = METHOD.prepare(run, Dataset.from_list([{"messages": CONVERSATION}]), "train")
    model = GemmaHFForCausalLM(tiny_config("gemma2", vocab_size=256000))
    recipe.training.max_length = None
    trainer = _trainer_class()(model=model, args=recipe.training, train_dataset=tokenized, processing_class=tok)
    row = trainer.train_dataset[0]
    ids, mask = encode_with_assistant_mask(tok, CONVERSATION, "gemma2")
    assert row["input_ids"] == ids
    assert row["labels"] == [t if m else -100 for t, m in zip(ids, mask)]
