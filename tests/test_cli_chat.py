"""`gemma-hf generate` / `gemma-hf chat` on a tiny checkpoint whose greedy answer is known: it
answers "Good" and then <end_of_turn>, so the stop at <end_of_turn> and the turn format are checked."""

from __future__ import annotations

import json

import pytest
import torch

from gemma_hf import GemmaHFForCausalLM
from gemma_hf.assets import gemma_tokenizer_tiny
from gemma_hf.sampling import chat_reply, load_chat_model
from tests.assets import tokenizer as load_tokenizer
from tests.clirun import run_cli
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def scripted_model(tmp_path_factory):
    """1 layer with zeroed outputs: the next token depends only on the current one. Every token maps
    to direction u1, except "Good" (u2); lm_head row "Good" = u1, row <end_of_turn> = u2. So after
    any prompt the model says "Good", then ends its turn. The tiny tokenizer, where "Good" is one token."""
    tok = load_tokenizer(gemma_tokenizer_tiny)
    good = tok("Good", add_special_tokens=False)["input_ids"][0]
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    config = tiny_config("gemma2", vocab_size=4096, num_hidden_layers=1, layer_types=["full_attention"],
                         hidden_size=8, head_dim=8, num_attention_heads=1, num_key_value_heads=1,
                         intermediate_size=8, query_pre_attn_scalar=8, tie_word_embeddings=False,
                         final_logit_softcapping=None)
    model = GemmaHFForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                param.zero_()
        u1, u2 = torch.eye(8)[0], torch.eye(8)[1]
        model.model.embed_tokens.weight.copy_(u1.expand(4096, 8))
        model.model.embed_tokens.weight[good] = u2
        model.lm_head.weight.zero_()
        model.lm_head.weight[good] = 10 * u1
        model.lm_head.weight[eot] = 10 * u2
    path = tmp_path_factory.mktemp("scripted")
    model.generation_config.eos_token_id = [1, eot]
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_generate_stops_at_end_of_turn(scripted_model, capsys):
    code, out, _ = run_cli(["generate", str(scripted_model), "--prompt", "Hi there", "--prompt", "Again", "--json"], capsys)
    assert code == 0
    replies = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in replies] == ["Good", "Good"]
    assert all(r["stop"] == "end_of_turn" and r["new_tokens"] == 2 for r in replies)
    code, out, _ = run_cli(["generate", str(scripted_model), "--prompt", "Hi"], capsys)
    assert code == 0 and out == "Good\n"


def test_generate_uses_the_chat_format(scripted_model):
    model, tok, family = load_chat_model(scripted_model)
    assert family == "gemma2"
    seen = {}
    original = model.generate

    def spy(**kwargs):
        seen["ids"] = kwargs["input_ids"][0].tolist()
        seen["eos"] = kwargs["eos_token_id"]
        return original(**kwargs)

    model.generate = spy
    reply = chat_reply(model, tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                       family, max_new_tokens=5)
    text = tok.decode(seen["ids"])
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.convert_tokens_to_ids("<end_of_turn>") in seen["eos"] and reply.stop == "end_of_turn"


def test_max_new_tokens_reports_unfinished_turn(scripted_model, capsys):
    code, out, err = run_cli(["generate", str(scripted_model), "--prompt", "Hi", "--max-new-tokens", "1", "--json"], capsys)
    reply = json.loads(out)
    assert code == 0 and reply["stop"] == "length" and reply["text"] == "Good"


def test_chat_repl_multi_turn_reset_exit(scripted_model, capsys, monkeypatch):
    code, out, _ = run_cli(["chat", str(scripted_model)], capsys, stdin="Hi\nHow are you?\n/reset\nHey\n/exit\nnever read\n",
                       monkeypatch=monkeypatch)
    assert code == 0
    assert out.count("model> Good") == 3 and "(conversation reset)" in out


def test_chat_bad_model_dir(tmp_path, capsys):
    code, _, err = run_cli(["generate", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 2 and "not a model directory" in err
