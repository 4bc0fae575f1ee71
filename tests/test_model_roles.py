"""Every model reference is checked against its role (issue 22, case 7), at validation, before any
weights load: the model a recipe trains or evaluates, the baseline, the judge, the teacher and the
model of `gemma-hf chat` / `generate` are causal LMs; a reward model is a sequence classifier. A
reward model given as the LM judge used to be accepted (a 0.5 win rate with interval [0.5, 0.5],
printed as a measurement), and `gemma-hf generate` on a reward model exited 0. Pipeline stages are
checked by the head of the model they will write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gemma_hf import GemmaHFForCausalLM, GemmaHFForSequenceClassification
from gemma_hf.assets import gemma3_270m, gemma_tokenizer_tiny, llamafactory_data
from tests.assets import require
from tests.assets import tokenizer as load_tokenizer
from tests.clirun import run_cli
from tests.test_pipeline import pipeline_file
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny reward model and a tiny causal LM (random weights, the tiny tokenizer), saved once."""
    require(gemma_tokenizer_tiny)
    require(llamafactory_data)
    tok = load_tokenizer(gemma_tokenizer_tiny)
    root = tmp_path_factory.mktemp("roles")
    for name, cls, extra in (("rm", GemmaHFForSequenceClassification, {"num_labels": 1}),
                             ("lm", GemmaHFForCausalLM, {})):
        cls(tiny_config("gemma2", vocab_size=4096, **extra)).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def _tiny(method: str, *args: str) -> list[str]:
    """`gemma-hf METHOD --config recipes/tiny/METHOD.yaml ARGS` (OUT, RM and LM filled in by the test)."""
    return [method, "--config", str(TINY / f"{method}.yaml"), "--output_dir", "OUT", *args]


FROM_CHECKPOINT = ("--preset", "null", "--preset_overrides", "null")

# (case, argv, the key the message names, what it says)
CASES = [
    ("eval-judge-is-a-reward-model", _tiny("eval", "--judge_name_or_path", "RM"), "judge_name_or_path",
     "the judge 'RM' is a reward model (GemmaHFForSequenceClassification), but a judge must be a causal LM"),
    ("eval-baseline-is-a-reward-model", _tiny("eval", "--baseline_name_or_path", "RM"), "baseline_name_or_path",
     "the baseline 'RM' is a reward model"),
    ("eval-model-is-a-reward-model", _tiny("eval", "--model_name_or_path", "RM", "--judge_name_or_path", "LM"),
     "model_name_or_path", "the evaluated model 'RM' is a reward model"),
    ("eval-reward-is-a-causal-lm", _tiny("eval", "--reward_name_or_path", "LM"), "reward_name_or_path",
     "the reward model 'LM' is a causal LM (GemmaHFForCausalLM), but a reward model must be a sequence classifier"),
    ("sft-from-a-reward-model", _tiny("sft", *FROM_CHECKPOINT, "--model_name_or_path", "RM"), "model_name_or_path",
     "the model to train 'RM' is a reward model"),
    ("rlhf-policy-is-a-reward-model", _tiny("rlhf", *FROM_CHECKPOINT, "--model_name_or_path", "RM"),
     "model_name_or_path", "the policy 'RM' is a reward model"),
    ("rlhf-reward-is-a-causal-lm", _tiny("rlhf", "--rewards", "[{model: LM}]"), "rewards[0].model",
     "the reward model 'LM' is a causal LM"),
    ("warp-policy-is-a-reward-model", _tiny("warp", *FROM_CHECKPOINT, "--model_name_or_path", "RM"),
     "model_name_or_path", "the policy 'RM' is a reward model"),
    ("distill-teacher-is-a-reward-model", _tiny("distill", "--teacher_name_or_path", "RM"), "teacher_name_or_path",
     "the teacher 'RM' is a reward model"),
    ("distill-student-is-a-reward-model",
     _tiny("distill", "--student_init", "null", "--model_name_or_path", "RM", "--teacher_name_or_path", "LM",
           "--tokenizer_name_or_path", "asset:gemma-tokenizer-tiny", "--attn_implementation", "eager"),
     "model_name_or_path", "the student 'RM' is a reward model"),
    ("generate-with-a-reward-model", ["generate", "RM", "--prompt", "Hi"], "",
     "the chat model 'RM' is a reward model (GemmaHFForSequenceClassification), but a chat model must be a causal LM"),
    ("chat-with-a-reward-model", ["chat", "RM"], "", "the chat model 'RM' is a reward model"),
    ("pipeline-judge-from-the-reward-stage", "judge", "stages[3] (eval).judge_name_or_path",
     "the judge {from: reward} is the output of pipeline stage 'reward': a reward model, but a judge must be a causal LM"),
    ("pipeline-reward-from-the-sft-stage", "reward", "stages[2] (rlhf).rewards[0].model",
     "the reward model {from: sft} is the output of pipeline stage 'sft': a causal LM"),
]


def _pipeline(tmp_path: Path, case: str) -> list[str]:
    def edit(data):
        if case == "judge":
            data["stages"][3]["overrides"]["judge_name_or_path"] = {"from": "reward"}
        else:
            data["stages"][2]["overrides"]["rewards"][0]["model"] = {"from": "sft"}

    return ["pipeline", "--config", str(pipeline_file(tmp_path, edit)), "--output_dir", "OUT"]


@pytest.mark.parametrize("case,argv,key,text", CASES, ids=[c[0] for c in CASES])
def test_a_model_of_the_wrong_kind_is_refused_at_validation_naming_the_key(models, tmp_path, capsys, monkeypatch,
                                                                        case, argv, key, text):
    if "eval" in case or "distill-teacher" in case:
        require(gemma3_270m)  # the tiny evaluation's model, the tiny distillation's teacher
    out = tmp_path / "out"
    names = {"OUT": str(out), "RM": str(models / "rm"), "LM": str(models / "lm")}
    if isinstance(argv, str):
        argv = _pipeline(tmp_path, argv)

    argv = [names.get(a, a) if not a.startswith("[{") else a.replace("LM", names["LM"]) for a in argv]
    code, stdout, err = run_cli(argv, capsys, stdin="Hi\n" if argv[0] == "chat" else None, monkeypatch=monkeypatch)
    text = text.replace("'RM'", repr(names["RM"])).replace("'LM'", repr(names["LM"]))
    assert code == 2, (stdout, err)
    assert (f"- {key}" in err if key else True) and text in err, err
    assert "fix: " in err or "point it at" in err
    assert "Traceback" not in err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    assert "model> " not in stdout and "== stage" not in stdout  # nothing answered, no stage run


def test_a_reward_model_may_start_from_a_reward_model_or_a_causal_lm(models, capsys):
    for start in ("rm", "lm"):
        code, out, err = run_cli(["validate", str(TINY / "reward.yaml"), *FROM_CHECKPOINT, "--max_length", "128",
                                  "--model_name_or_path", str(models / start)], capsys)
        assert code == 0, err
