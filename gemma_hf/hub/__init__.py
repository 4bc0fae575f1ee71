"""Model cards rendered from a run directory, and pushing a run to the Hugging Face Hub.

- :mod:`.cards`: :func:`render_card` / :func:`write_card` build README.md from the run directory
  (read through gemma_hf.rundir.RunDir) and ``model_cards/gemma_hf_card.md``;
- :mod:`.checks`: :func:`validate_card` checks a card offline (``ModelCard.validate`` needs the Hub);
- :mod:`.plan`: :func:`upload_plan` decides exactly which files a push of the whole model uploads;
- :mod:`.adapter`: :func:`adapter_plan`, the same for a LoRA run's adapter alone (``--adapter-only``), with
  its card (:func:`render_adapter_card`) naming the base model by Hub id;
- :mod:`.push`: :func:`push_to_hub` creates the repository (private by default) and uploads a plan's
  files in one commit.
"""

from .adapter import AdapterPlan, adapter_plan
from .cards import (CARD_TEMPLATE, CardInputs, card_data, match_preset, read_run, render_adapter_card, render_card,
                    write_card)
from .checks import CITATIONS, REQUIRED_SECTIONS, CardError, validate_card
from .plan import IGNORE_PATTERNS, UploadPlan, upload_plan
from .push import HubError, PushResult, push_to_hub

__all__ = [
    "CardError",
    "HubError",
    "CardInputs",
    "UploadPlan",
    "AdapterPlan",
    "PushResult",
    "CARD_TEMPLATE",
    "CITATIONS",
    "REQUIRED_SECTIONS",
    "IGNORE_PATTERNS",
    "read_run",
    "match_preset",
    "card_data",
    "render_card",
    "render_adapter_card",
    "write_card",
    "validate_card",
    "upload_plan",
    "adapter_plan",
    "push_to_hub",
]
