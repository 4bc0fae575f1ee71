"""Students built from a teacher: config, layer types, copied tensors, logits."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from gemma_hf.distillation.student import (
    check_keep_layers,
    every_kth,
    parameter_counts,
    student_config,
    student_from_teacher,
)
from tiny import make_ours, random_ids


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def test_keep_layers_0_2_config_types_and_tensors():
    teacher = make_ours("gemma2")  # layer types: sliding, full, sliding, full
    with pytest.warns(UserWarning, match="keeps no full-attention"):
        student = student_from_teacher(teacher, [0, 2])
    config, tconfig = student.config, teacher.config
    assert config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert config.layer_types == [tconfig.layer_types[0], tconfig.layer_types[2]]
    assert [layer.attention_type for layer in student.model.layers] == config.layer_types
    for field in ("hidden_size", "vocab_size", "sliding_window", "attn_logit_softcapping", "final_logit_softcapping",
                  "query_pre_attn_scalar", "rope_theta", "rope_local_base_freq", "use_post_norms", "family"):
        assert getattr(config, field) == getattr(tconfig, field), field
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    source = {0: 0, 1: 2}
    for name, tensor in student_state.items():
        if name.startswith("model.layers."):
            j = int(name.split(".")[2])
            teacher_name = name.replace(f"model.layers.{j}.", f"model.layers.{source[j]}.", 1)
        else:
            teacher_name = name
        assert torch.equal(tensor, teacher_state[teacher_name]), name
        assert tensor.data_ptr() != teacher_state[teacher_name].data_ptr(), f"{name} shares storage"
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied
    counts = parameter_counts(student)
    assert counts["total"] == sum(p.numel() for p in student.parameters())
    assert counts["embedding"] == config.vocab_size * config.hidden_size


def test_all_layers_gives_the_teacher_exactly():
    teacher = make_ours("gemma2")
    student = student_from_teacher(teacher, list(range(teacher.config.num_hidden_layers)))
    ids = random_ids(2, 24)  # runs past the sliding window (8)
    assert torch.equal(logits(student, ids), logits(teacher, ids))


def test_subset_equals_teacher_running_only_those_layers():
    """Gemma 3 (5 local : 1 global, two RoPE bases): keep a local and the global layer; the student's
    logits equal the teacher's stack cut down to those two layers."""
    teacher = make_ours("gemma3")
    student = student_from_teacher(teacher, [2, 5])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert (student.config.rope_theta, student.config.rope_local_base_freq) == (1_000_000.0, 10_000.0)
    manual = copy.deepcopy(teacher)
    manual.model.layers = torch.nn.ModuleList([manual.model.layers[2], manual.model.layers[5]])
    ids = random_ids(2, 20)
    assert torch.equal(logits(student, ids), logits(manual, ids))


def test_from_a_checkpoint_directory(tmp_path):
    teacher = make_ours("gemma2")
    teacher.save_pretrained(tmp_path / "teacher")
    student = student_from_teacher(tmp_path / "teacher", [1, 2])
    ids = random_ids(1, 12)
    assert torch.equal(logits(student, ids), logits(student_from_teacher(teacher, [1, 2]), ids))
    assert student_config(tmp_path / "teacher", [1, 2]).layer_types == ["full_attention", "sliding_attention"]


@pytest.mark.parametrize("keep,message", [
    ([], "empty"),
    ([2, 0], "not sorted"),
    ([0, 0], "repeats layers \\[0\\]"),
    ([0, 4], "outside the teacher's 4 layers"),
    ([0, "1"], "non-integer"),
    ([True], "non-integer"),
    (3, "must be a non-empty, sorted list"),
])
def test_keep_layers_validation(keep, message):
    with pytest.raises(ValueError, match=message):
        check_keep_layers(keep, 4)


def test_overrides():
    teacher = make_ours("gemma2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # [1, 2] keeps a global layer: no warning
        config = student_config(teacher, [1, 2], sliding_window=4)
    assert config.sliding_window == 4
    with pytest.raises(ValueError, match="hidden_size=32 differs from the teacher's 64"):
        student_config(teacher, [1, 2], hidden_size=32)
    with pytest.raises(ValueError, match="follows from keep_layers"):
        student_config(teacher, [1, 2], num_hidden_layers=2)


def test_every_kth():
    assert every_kth(6, 2) == [0, 2, 4]
    assert every_kth(5, 3) == [0, 3]
    assert every_kth(4, 1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="positive integer"):
        every_kth(4, 0)
