"""Model cards rendered from a run directory, and pushing a run to the Hugging Face Hub.

- :mod:`.cards`: :func:`render_card` / :func:`write_card` build README.md from the run directory
  (read through gemma_hf.rundir.RunDir) and ``model_cards/gemma_hf_card.md``;
- :mod:`.checks`: :func:`validate_card` checks a card offline (``ModelCard.validate`` needs the Hub);
- :mod:`.push`: :func:`upload_plan` decides exactly which files a push uploads; :func:`push_to_hub`
  creates the repository (private by default) and uploads those files in one commit.
"""

from .cards import CARD_TEMPLATE, CardInputs, card_data, match_preset, read_run, render_card, write_card
from .checks import CITATIONS, REQUIRED_SECTIONS, CardError, validate_card
from .push import IGNORE_PATTERNS, HubError, PushResult, UploadPlan, push_to_hub, upload_plan

__all__ = [
    "CardError",
    "HubError",
    "CardInputs",
    "UploadPlan",
    "PushResult",
    "CARD_TEMPLATE",
    "CITATIONS",
    "REQUIRED_SECTIONS",
    "IGNORE_PATTERNS",
    "read_run",
    "match_preset",
    "card_data",
    "render_card",
    "write_card",
    "validate_card",
    "upload_plan",
    "push_to_hub",
]
