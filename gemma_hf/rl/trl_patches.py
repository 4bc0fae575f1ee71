"""One targeted adjustment of TRL (1.16) for CPU runs, applied by the RLHF methods.

TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, used by RLOO/GRPO/DPO to get per-token
log-probabilities without [B, T, V] logits) scores only the labelled positions on Triton devices;
elsewhere it scores every position of the batch, prompts included, so that tile shapes stay fixed
for compilers (Neuron). Eager CPU execution has no such concern, and for RL batches (long prompts,
short completions, a 256k vocabulary) scoring the prompt positions is most of the step: ~80% of
a tiny model's RLOO step on this CPU. :func:`score_labelled_positions_only` makes the fused head
compact on CPU too. The result is the same (unscored positions are zero either way: the head
``masked_scatter``s the compact values back); tests/test_rlhf.py checks it against TRL's default.

Library behaviour relied on: ``trl.trainer.utils`` imports ``_use_triton`` by name and calls it only
to choose compact scoring; the kernel module (trl.kernels.chunked_logprob) keeps its own reference
for choosing Triton kernels, which this does not touch.
"""

from __future__ import annotations

_PATCHED = False


def score_labelled_positions_only() -> None:
    """Idempotent: TRL's fused head scores only labelled positions on CPU as well."""
    global _PATCHED
    if _PATCHED:
        return
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton

    def compact_on_cpu(device):
        return original(device) or device.type == "cpu"

    trl_utils._use_triton = compact_on_cpu
    _PATCHED = True


__all__ = ["score_labelled_positions_only"]
