"""Offline checks of a model card (the Hub's own validation needs the network)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

# The Hub's pipeline tag of each head.
PIPELINE_TAGS = {"causal-lm": "text-generation", "sequence-classification": "text-classification"}

# BibTeX keys of the two reports cited on every card (the template carries the entries).
CITATIONS = ("gemma_2024", "gemma_2024_gemma2")

# Sections every card must have (validate_card checks them).
REQUIRED_SECTIONS = (
    "## Model details",
    "## Training",
    "### Resolved recipe",
    "## Metrics",
    "## Evaluation",
    "## Intended use",
    "## Limitations and risks",
    "## License",
    "## Citation",
)


class CardError(ValueError):
    """The run directory cannot produce a valid card (missing or malformed file, invalid card)."""


# ---------------------------------------------------------------------------------------------
# Offline validation


def validate_card(content: str | os.PathLike):
    """Check a model card without the network; return the parsed huggingface_hub ModelCard.

    `ModelCard.validate()` asks the Hub's /api/validate-yaml endpoint. Offline we check what we
    can: the card parses with ModelCard (YAML front matter is a mapping), the metadata fields
    the Hub reads have the right types and values (license `gemma`, library_name `transformers`
    (`peft` for an adapter, which names its base_model),
    a pipeline_tag, tags, base_model / datasets as Hub ids), the metadata round-trips through
    ModelCardData and through the card text unchanged, and the body has every required section.
    Raises CardError listing every problem.
    """
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if isinstance(content, os.PathLike) or (isinstance(content, str) and "\n" not in content and Path(content).is_file()):
        content = Path(content).read_text(encoding="utf-8")
    problems = []
    if not content.startswith("---\n"):
        raise CardError("model card: no YAML front matter (the file must start with a '---' line).")
    try:
        card = ModelCard(content)
    except (ValueError, yaml.YAMLError) as err:
        raise CardError(f"model card: front matter does not parse: {err}") from None
    data = card.data.to_dict()

    if data.get("license") != "gemma":
        problems.append(f"license must be 'gemma' (Gemma Terms of Use), got {data.get('license')!r}")
    adapter = data.get("base_model_relation") == "adapter"  # a LoRA adapter's card (gemma-hf push --adapter-only)
    library = "peft" if adapter else "transformers"
    if data.get("library_name") != library:
        problems.append(f"library_name must be {library!r}" + (" (the card of an adapter)" if adapter else "")
                        + f", got {data.get('library_name')!r}")
    if adapter and not data.get("base_model"):
        problems.append("an adapter's card must name its base_model (a Hub id)")
    if data.get("pipeline_tag") not in PIPELINE_TAGS.values():
        problems.append(f"pipeline_tag must be one of {sorted(PIPELINE_TAGS.values())}, got {data.get('pipeline_tag')!r}")
    tags = data.get("tags")
    if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t for t in tags):
        problems.append(f"tags must be a non-empty list of strings, got {tags!r}")
    elif "gemma_hf" not in tags:
        problems.append("tags must include 'gemma_hf'")
    for key in ("base_model", "datasets"):
        value = data.get(key)
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            try:
                if not isinstance(item, str):
                    raise HFValidationError(f"not a string: {item!r}")
                validate_repo_id(item)
            except HFValidationError as err:
                problems.append(f"{key}: {item!r} is not a Hub repository id ({err})")
    if data.get("base_model_relation") not in (None, "adapter", "merge", "quantized", "finetune"):
        problems.append(f"base_model_relation {data.get('base_model_relation')!r} is not one the Hub knows")
    if ModelCardData(**data).to_dict() != data:
        problems.append("metadata does not round-trip through ModelCardData")
    if ModelCard(str(card)).data.to_dict() != data:
        problems.append("metadata does not round-trip through the card text")
    for section in REQUIRED_SECTIONS:
        if not re.search(rf"^{re.escape(section)}\s*$", card.text, flags=re.MULTILINE):
            problems.append(f"body lacks the section {section!r}")
    for key in CITATIONS:
        if f"@article{{{key}," not in card.text:
            problems.append(f"body lacks the BibTeX entry {key!r}")
    if problems:
        raise CardError("invalid model card:\n  - " + "\n  - ".join(problems))
    return card


