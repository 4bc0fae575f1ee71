"""The on-policy distillation trainer (GKD) behind ``gemma-hf distill`` (gemma_hf.recipes.distill),
on transformers' Trainer, with our chunked losses (gemma_hf.distillation.losses); and the held-out
metrics every distill run reports, whatever its mode (:func:`heldout_distillation_metrics`).

Why not TRL's: ``trl.DistillationTrainer`` (1.16) is fully on-policy (no lmbda, no sequence-level
KD); the experimental ``GKDTrainer`` has both but builds full student and teacher [B, T, V] logits
and flips its on-policy coin with ``random.random()`` in each process independently. Here the coin
is ``Random(seed, step)`` (every process draws the same), generation goes through TRL's
``unwrap_model_for_generation``, and the divergence is computed chunk by chunk from hidden states.

Batches (batches.py) hold left-padded prompts and right-padded completions; the sequence fed to
both models is ``prompt | completion`` with explicit position ids (left padding never shifts
positions), and the loss covers the completion tokens up to and including the first stop token.
The offline trainer is in offline.py; the recipe picks one of the two by ``distill_mode``.
"""

from __future__ import annotations

import random

import torch

from gemma_hf.chat import stop_token_ids
from gemma_hf.trainer_utils import loss_only_prediction_step, plain_trainer_kwargs

from .batches import PromptCompletionCollator, completion_hidden, head_of, stop_mask
from .losses import generalized_jsd, next_token_nll


def generate_completions(model, batch, max_new_tokens: int, temperature: float, stops: list[int], pad_id: int):
    """Sampled completions of the batch's prompts (temperature; stops at <end_of_turn>/<eos>)."""
    with torch.no_grad():
        out = model.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"],
                             max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=1.0,
                             top_k=0, eos_token_id=stops, pad_token_id=pad_id)
    completion = out[:, batch["prompt_ids"].shape[1]:]
    if completion.shape[1] == 0:
        completion = torch.full((completion.shape[0], 1), stops[0], device=completion.device)
    completion, mask = stop_mask(completion, stops, pad_id)
    return {**batch, "completion_ids": completion, "completion_mask": mask}


def heldout_distillation_metrics(student, teacher, dataset, pad_id: int, batch_size: int, device) -> dict:
    """Per-token KL(teacher || student) and the student's loss on the held-out completions (the data's)."""
    collate = PromptCompletionCollator(pad_id)
    was_training = student.training
    student.eval()
    kl_sum = nll_sum = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate(rows).items()}
            mask = batch["completion_mask"]
            count = mask.sum().item()
            s_hidden, t_hidden = completion_hidden(student, batch), completion_hidden(teacher, batch)
            s_weight, s_cap = head_of(student)
            t_weight, t_cap = head_of(teacher)
            kl = generalized_jsd(s_hidden, s_weight, t_hidden, t_weight, mask, beta=0.0, temperature=1.0,
                                 student_softcap=s_cap, teacher_softcap=t_cap)
            nll = next_token_nll(s_hidden, s_weight, batch["completion_ids"], mask, softcap=s_cap)
            kl_sum += kl.item() * count
            nll_sum += nll.item() * count
            tokens += count
    if was_training:
        student.train()
    if not tokens:
        return {}
    return {"kl_teacher_student": kl_sum / tokens, "student_loss": nll_sum / tokens, "tokens": int(tokens)}


def make_distillation_trainer(run, teacher, **kwargs):
    """The on-policy (GKD) trainer of a distill run; `kwargs`: the engine's trainer arguments."""
    from transformers import Trainer

    args = run.recipe.method_args
    kwargs = plain_trainer_kwargs(kwargs)
    pad_id = run.tokenizer.pad_token_id
    stops = stop_token_ids(run.tokenizer)
    seed = run.recipe.training.seed

    class GemmaDistillTrainer(Trainer):
        """On-policy GKD: completions from the student (probability lmbda), else the teacher's (seq_kd)
        or the data's; loss = (1 - nll_weight) * JSD(beta) + nll_weight * NLL(data completions)."""

        def __init__(self, **inner):
            super().__init__(**inner)
            self.teacher = teacher.to(self.args.device)
            self.generations = {"student": 0, "teacher": 0, "data": 0}

        def source(self, step: int) -> str:
            if random.Random(f"{seed}:{step}").random() < args.lmbda:
                return "student"
            return "teacher" if args.seq_kd else "data"

        def training_step(self, model, inputs, num_items_in_batch=None):
            from trl.models.utils import unwrap_model_for_generation

            inputs = self._prepare_inputs(inputs)
            source = self.source(self.state.global_step)
            if source != "data":
                generator = model if source == "student" else self.teacher
                with unwrap_model_for_generation(generator, self.accelerator) as unwrapped:
                    was_training = unwrapped.training
                    unwrapped.eval()
                    inputs = generate_completions(unwrapped, inputs, args.max_new_tokens, args.temperature, stops,
                                                  pad_id)
                    if was_training:
                        unwrapped.train()
            self.generations[source] += 1
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mask = inputs["completion_mask"]
            s_hidden = completion_hidden(model, inputs)
            with torch.no_grad():
                t_hidden = completion_hidden(self.teacher, inputs)
            s_weight, s_cap = head_of(model)
            t_weight, t_cap = head_of(self.teacher)
            loss = generalized_jsd(s_hidden, s_weight, t_hidden, t_weight, mask, beta=args.beta,
                                   temperature=args.temperature, student_softcap=s_cap, teacher_softcap=t_cap)
            if args.nll_weight:
                nll = next_token_nll(s_hidden, s_weight, inputs["completion_ids"], mask, softcap=s_cap)
                loss = (1 - args.nll_weight) * loss + args.nll_weight * nll
            return (loss, None) if return_outputs else loss

        prediction_step = loss_only_prediction_step

        def log(self, logs, start_time=None):
            # run.json's counts; log() also runs at the end of training (and of a resume that trains nothing)
            run.info["generations"] = dict(self.generations)
            if "loss" in logs:
                logs = {**logs, **{f"generated_by_{k}": v for k, v in self.generations.items()}}
            super().log(logs, start_time)

    return GemmaDistillTrainer(data_collator=PromptCompletionCollator(pad_id), **kwargs)


__all__ = ["heldout_distillation_metrics", "make_distillation_trainer", "generate_completions"]
