"""Weight averaging (gemma_hf.merging, `gemma-hf merge`): the SLERP / LITI / linear / EMA arithmetic
against hand-computed cases, the streaming merges on checkpoint directories (sharded, stock, run
directories), the refusals with nothing written, the merged model's logits, memory that does not
grow with the model or the number of inputs, and the command line."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gemma_hf.merging import (
    PARALLEL_SIN_THRESHOLD,
    IncompatibleModelsError,
    MergeError,
    NonFiniteError,
    check_eta,
    check_weights,
    ema_update,
    fold_slerp_coefficients,
    linear_merge,
    liti,
    slerp,
    slerp_merge,
    slerp_task_vectors,
)
from gemma_hf.merging import safetensors_stream
from tests.clirun import run_cli
from tiny import BLOCK_GEMMA_HF_IMPORTS, make_ours, max_abs_diff, random_ids, stock_from, tiny_config

SQ = math.sqrt


def e(i: int, n: int = 4) -> torch.Tensor:
    return torch.eye(n, dtype=torch.float64)[i]


# ---------------------------------------------------------------------------------------------
# Helpers: checkpoints made of chosen tensors, and reading them back


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], variant: str = "gemma1-mqa", **config) -> Path:
    """A model directory with a tiny gemma_hf config.json and exactly `tensors` (any names)."""
    directory.mkdir(parents=True)
    tiny_config(variant, **config).save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    return directory


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def leftovers(parent: Path) -> list[str]:
    """Temporary directories a merge may have left behind in `parent`."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def ref_slerp(u: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """The paper's formula, written out independently of the library (float64)."""
    u, v = u.double().flatten(), v.double().flatten()
    if u.norm() == 0 or v.norm() == 0:
        return (1 - lam) * u + lam * v
    omega = torch.arccos(torch.clamp(u @ v / (u.norm() * v.norm()), -1, 1))
    if torch.sin(omega) < PARALLEL_SIN_THRESHOLD:
        return (1 - lam) * u + lam * v
    return (torch.sin((1 - lam) * omega) * u + torch.sin(lam * omega) * v) / torch.sin(omega)


def ref_slerp_merge(base: dict, models: list[dict]) -> dict:
    out = {}
    for name, init in base.items():
        merged = models[0][name].double() - init.double()
        for m, model in enumerate(models[1:], start=2):
            merged = ref_slerp(merged, model[name].double() - init.double(), 1 / m)
        out[name] = (init.double() + merged.reshape(init.shape)).to(init.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# SLERP arithmetic on tensors, by hand


def test_slerp_of_orthogonal_unit_vectors():
    assert torch.allclose(slerp(e(0), e(1), 0.5), (e(0) + e(1)) / SQ(2), atol=1e-15)
    # a quarter of the way along the great circle: angle pi/8 from e0
    assert torch.allclose(slerp(e(0), e(1), 0.25), math.cos(math.pi / 8) * e(0) + math.sin(math.pi / 8) * e(1), atol=1e-15)
    # 60 degrees apart, halfway: the bisector, of unit norm
    v = 0.5 * e(0) + SQ(3) / 2 * e(1)
    assert torch.allclose(slerp(e(0), v, 0.5), math.cos(math.pi / 6) * e(0) + math.sin(math.pi / 6) * e(1), atol=1e-15)


def test_slerp_of_parallel_and_antiparallel_vectors_is_linear():
    u = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    assert torch.allclose(slerp(u, 2 * u, 0.25), 0.75 * u + 0.25 * 2 * u, atol=1e-15)  # parallel
    assert torch.allclose(slerp(u, -u, 0.25), 0.5 * u, atol=1e-15)  # antiparallel: (1 - lam) u - lam u
    assert torch.equal(slerp(u, -u, 0.5), torch.zeros(4, dtype=torch.float64))
    assert torch.allclose(slerp(u, -3 * u, 0.5), -u, atol=1e-15)


def test_slerp_with_a_zero_task_vector_is_linear():
    u, zero = torch.tensor([3.0, 4.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    assert torch.allclose(slerp(u, zero, 0.25), 0.75 * u)
    assert torch.allclose(slerp(zero, u, 0.25), 0.25 * u)
    assert torch.equal(slerp(zero, zero, 0.5), zero)


def test_slerp_of_a_vector_with_itself_is_that_vector():
    a = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    for lam in (0.0, 0.2, 0.5, 1.0):
        assert torch.allclose(slerp(a, a, lam), a, atol=1e-7)
        assert slerp(a, a, lam).shape == (3, 5)


def test_slerp_keeps_the_norm_of_unit_vectors_where_linear_shrinks_it():
    lerp = 0.5 * e(0) + 0.5 * e(1)
    assert lerp.norm().item() == pytest.approx(SQ(0.5), abs=1e-15)
    assert slerp(e(0), e(1), 0.5).norm().item() == pytest.approx(1.0, abs=1e-15)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        u, v = torch.randn(64, generator=gen, dtype=torch.float64), torch.randn(64, generator=gen, dtype=torch.float64)
        u, v = u / u.norm(), v / v.norm()
        for lam in (0.1, 1 / 3, 0.5, 0.9):
            assert slerp(u, v, lam).norm().item() == pytest.approx(1.0, abs=1e-12)
            assert slerp(u, v, lam) @ u == pytest.approx(math.cos(lam * math.acos(u @ v)), abs=1e-12)


def test_slerp_switches_to_linear_only_within_the_threshold():
    u = e(0)
    inside = math.cos(PARALLEL_SIN_THRESHOLD / 2) * e(0) + math.sin(PARALLEL_SIN_THRESHOLD / 2) * e(1)
    outside = math.cos(PARALLEL_SIN_THRESHOLD * 2) * e(0) + math.sin(PARALLEL_SIN_THRESHOLD * 2) * e(1)
    assert torch.allclose(slerp(u, inside, 0.5), 0.5 * (u + inside), atol=1e-15)
    assert slerp(u, outside, 0.5).norm().item() == pytest.approx(1.0, abs=1e-15)
    # near parallel, the two agree to float32 precision: the switch is invisible
    assert (slerp(u, outside, 0.5) - 0.5 * (u + outside)).norm() < 1e-6


def test_fold_of_three_runs_written_out_by_hand():
    # merged_2 = slerp(e0, e1, 1/2) = (e0 + e1) / sqrt 2, at 90 degrees from e2;
    # merged_3 = slerp(merged_2, e2, 1/3) = sin(60deg) merged_2 + sin(30deg) e2
    expected = SQ(6) / 4 * (e(0) + e(1)) + 0.5 * e(2)
    assert torch.allclose(slerp_task_vectors([e(0), e(1), e(2)]), expected, atol=1e-15)
    assert expected.norm().item() == pytest.approx(1.0)
    gram = torch.eye(3, dtype=torch.float64)
    c, stats = fold_slerp_coefficients(gram)
    assert c == pytest.approx([SQ(6) / 4, SQ(6) / 4, 0.5], abs=1e-15)
    assert stats["lerp_fallbacks"] == 0 and stats["cosines"] == [0.0, 0.0, 0.0]


def test_fold_in_coefficient_space_equals_the_fold_on_tensors():
    gen = torch.Generator().manual_seed(2)
    for m in (2, 3, 5):
        deltas = [torch.randn(50, generator=gen, dtype=torch.float64) + 0.5 for _ in range(m)]
        d = torch.stack(deltas)
        c, _ = fold_slerp_coefficients(d @ d.T)
        assert torch.allclose(torch.tensor(c, dtype=torch.float64) @ d, slerp_task_vectors(deltas), atol=1e-12)
    # degenerate folds: parallel runs, antiparallel runs that cancel, a zero run
    v = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    for deltas, expected in (([v, 2 * v, 3 * v], 2 * v), ([v, -v, v], v / 3), ([0 * v, 0 * v, v], v / 3)):
        d = torch.stack(deltas)
        c, stats = fold_slerp_coefficients(d @ d.T)
        assert torch.allclose(torch.tensor(c, dtype=torch.float64) @ d, expected, atol=1e-15)
        assert torch.allclose(slerp_task_vectors(deltas), expected, atol=1e-15)
        assert stats["lerp_fallbacks"] == 2


# ---------------------------------------------------------------------------------------------
# EMA, weights, eta


def test_ema_update_matches_the_closed_form():
    gen = torch.Generator().manual_seed(3)
    mu = 0.1
    ema0 = torch.randn(6, generator=gen, dtype=torch.float64)
    thetas = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(7)]
    ema = ema0.clone()
    for theta in thetas:
        assert ema_update(ema, theta, mu) is ema
    k = len(thetas)
    closed = (1 - mu) ** k * ema0 + sum(mu * (1 - mu) ** (k - j) * thetas[j - 1] for j in range(1, k + 1))
    assert torch.allclose(ema, closed, atol=1e-14)
    # a constant target: ema_k = target + (1 - mu)^k (ema_0 - target)
    ema, target = ema0.clone(), thetas[0]
    for _ in range(30):
        ema_update(ema, target, mu)
    assert torch.allclose(ema, target + (1 - mu) ** 30 * (ema0 - target), atol=1e-14)


def test_ema_update_on_state_dicts_and_modules_in_place():
    torch.manual_seed(0)
    ema_model, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {k: v.detach().clone() for k, v in ema_model.state_dict().items()}
    weight = ema_model.weight
    ema_update(ema_model, model, 0.25)
    assert ema_model.weight is weight  # in place: optimisers and hooks keep their references
    for name, value in ema_model.state_dict().items():
        assert torch.allclose(value, 0.75 * before[name] + 0.25 * model.state_dict()[name])
    sd = {"a": torch.zeros(2, dtype=torch.bfloat16), "step": torch.tensor(3)}
    ema_update(sd, {"a": torch.ones(2, dtype=torch.bfloat16), "step": torch.tensor(4)}, 0.5)
    assert sd["a"].dtype == torch.bfloat16 and sd["a"].tolist() == [0.5, 0.5] and sd["step"].item() == 4
    ema_update(sd, {"a": torch.full((2,), 7.0), "step": torch.tensor(5)}, 1.0)
    assert sd["a"].tolist() == [7.0, 7.0]
    with pytest.raises(KeyError, match="'b' is in the current weights but not in the EMA"):
        ema_update({"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(2)}, 0.1)
    with pytest.raises(ValueError, match="shape"):
        ema_update({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.1)
    for mu in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mu must be in"):
            ema_update(torch.zeros(2), torch.zeros(2), mu)


def test_linear_weights_and_eta_are_checked():
    assert check_weights(None, 4) == [0.25] * 4
    assert check_weights([0.2, 0.8], 2) == [0.2, 0.8]
    assert check_weights([1, 3], 2, normalize=True) == [0.25, 0.75]
    with pytest.raises(ValueError, match=r"sum to 4, not 1.*\(0.25 0.75\).*--normalize"):
        check_weights([1, 3], 2)
    with pytest.raises(ValueError, match="finite"):
        check_weights([float("nan"), 1.0], 2)
    with pytest.raises(ValueError, match="one weight per model"):
        check_weights([1.0], 2)
    with pytest.raises(ValueError, match="negative.*--allow-extrapolation"):
        check_weights([1.5, -0.5], 2)
    assert check_weights([1.5, -0.5], 2, allow_extrapolation=True) == [1.5, -0.5]
    with pytest.raises(ValueError, match="sum must be positive"):
        check_weights([1.0, -1.0], 2, normalize=True)
    assert check_eta(0) == 0.0 and check_eta(1) == 1.0 and check_eta(0.3) == 0.3
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            check_eta(bad)
    with pytest.raises(ValueError, match="extrapolates.*--allow-extrapolation"):
        check_eta(1.5)
    assert check_eta(1.5, allow_extrapolation=True) == 1.5


# ---------------------------------------------------------------------------------------------
# Streaming merges of checkpoint directories, hand-computed


def test_linear_merge_with_weights(tmp_path):
    a = {"x": torch.tensor([1.0, 2.0, 3.0]), "y": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    b = {"x": torch.tensor([3.0, 2.0, 1.0]), "y": torch.tensor([[0.0, 2.0], [2.0, 0.0]])}
    c = {"x": torch.tensor([0.0, 10.0, 0.0]), "y": torch.tensor([[4.0, 4.0], [4.0, 4.0]])}
    dirs = [write_checkpoint(tmp_path / n, t) for n, t in (("a", a), ("b", b), ("c", c))]
    linear_merge(dirs, tmp_path / "w", weights=[0.5, 0.3, 0.2])
    out = read_tensors(tmp_path / "w")
    assert torch.allclose(out["x"], torch.tensor([1.4, 3.6, 1.8]), atol=1e-7)
    assert torch.allclose(out["y"], torch.tensor([[1.3, 1.4], [1.4, 1.3]]), atol=1e-7)
    linear_merge(dirs, tmp_path / "u")  # uniform
    assert torch.allclose(read_tensors(tmp_path / "u")["x"], torch.tensor([4 / 3, 14 / 3, 4 / 3]), atol=1e-7)
    record = json.loads((tmp_path / "w" / "merge.json").read_text())
    assert record["method"] == "linear" and record["weights"] == [0.5, 0.3, 0.2]
    assert [i["path"] for i in record["inputs"]] == [str(d.resolve()) for d in dirs]


def test_slerp_merge_per_tensor_cases(tmp_path):
    v = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    w = torch.tensor([0.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    base = {"orth": torch.tensor([0.5, -1.0, 2.0, 0.25]), "par": torch.zeros(4), "anti": torch.ones(4),
            "zero": torch.full((4,), 2.0), "same": torch.zeros(2, 2), "mat": torch.zeros(2, 2)}
    deltas = {  # name -> the three runs' task vectors
        "orth": [e(0), e(1), e(2)],
        "par": [v, 2 * v, 3 * v],
        "anti": [v, -v, v],
        "zero": [0 * v, 0 * v, w],
        "same": [v.reshape(2, 2)] * 3,
        "mat": [e(0).reshape(2, 2), e(3).reshape(2, 2), e(0).reshape(2, 2)],
    }
    expected = {
        "orth": SQ(6) / 4 * (e(0) + e(1)) + 0.5 * e(2),
        "par": 2 * v,
        "anti": v / 3,  # v and -v cancel to zero, then lerp(0, v, 1/3)
        "zero": w / 3,
        "same": v.reshape(2, 2),
        # merged_2 = (e0 + e3)/sqrt2 is 45 degrees from e0: slerp(., e0, 1/3) = sin(30)/sin(45) m2 + sin(15)/sin(45) e0
        "mat": (math.sin(math.pi / 6) / math.sin(math.pi / 4) * (e(0) + e(3)) / SQ(2)
                + math.sin(math.pi / 12) / math.sin(math.pi / 4) * e(0)).reshape(2, 2),
    }
    write_checkpoint(tmp_path / "init", base)
    runs = [write_checkpoint(tmp_path / f"run{m}", {k: (base[k].double() + deltas[k][m]).float() for k in base})
            for m in range(3)]
    result = slerp_merge(tmp_path / "init", runs, tmp_path / "out")
    out = read_tensors(tmp_path / "out")
    for name in base:
        assert torch.allclose(out[name].double(), base[name].double() + expected[name], atol=1e-6), name
    assert result.stats["zero_task_vectors"] == 2  # the two zero runs of "zero"
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["method"] == "slerp" and record["inputs"][0]["role"] == "base"
    assert record["lerp_when_sin_below"] == PARALLEL_SIN_THRESHOLD


def test_slerp_of_a_model_with_itself_is_that_model(tmp_path):
    """Two runs with the same weights (a copy: the same directory twice is refused, see
    test_an_input_given_twice_or_the_base_as_a_model_is_refused) merge to those weights."""
    gen = torch.Generator().manual_seed(4)
    init = {"w": torch.randn(300, 400, generator=gen), "b": torch.randn(7, generator=gen)}  # float32 and float64 paths
    a = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in init.items()}
    write_checkpoint(tmp_path / "init", init)
    write_checkpoint(tmp_path / "a", a)
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")
    slerp_merge(tmp_path / "init", [tmp_path / "a", tmp_path / "a-copy"], tmp_path / "out")
    out = read_tensors(tmp_path / "out")
    for name in init:
        assert max_abs_diff(out[name], a[name]) <= 1e-6, name


def test_liti_at_eta_0_1_and_0_3_in_one_pass(tmp_path):
    gen = torch.Generator().manual_seed(5)
    init = {"w": torch.randn(400, 300, generator=gen), "n": torch.randn(16, generator=gen)}
    model = {k: torch.randn(v.shape, generator=gen) for k, v in init.items()}
    write_checkpoint(tmp_path / "init", init)
    write_checkpoint(tmp_path / "m", model)
    outs = [tmp_path / "eta0", tmp_path / "eta1", tmp_path / "eta03"]
    result = liti(tmp_path / "init", tmp_path / "m", [0.0, 1.0, 0.3], outs)
    assert result.outputs == [o.resolve() for o in outs]
    assert result.bytes_read == sum(v.numel() * 4 for v in init.values()) * 2  # both inputs read once
    got = [read_tensors(o) for o in outs]
    for name in init:
        assert torch.equal(got[0][name], init[name]), name  # eta 0: the initialisation, bit for bit
        assert torch.equal(got[1][name], model[name]), name  # eta 1: the model, bit for bit
        assert torch.allclose(got[2][name], 0.7 * init[name] + 0.3 * model[name], atol=1e-6), name
    assert json.loads((outs[2] / "merge.json").read_text())["eta"] == 0.3


def test_liti_refuses_bad_eta_and_allows_extrapolation_when_asked(tmp_path):
    write_checkpoint(tmp_path / "init", {"w": torch.zeros(3)})
    write_checkpoint(tmp_path / "m", {"w": torch.ones(3)})
    for eta in (-0.5, float("nan"), 1.5):
        with pytest.raises(MergeError, match="eta"):
            liti(tmp_path / "init", tmp_path / "m", eta, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    liti(tmp_path / "init", tmp_path / "m", 1.5, tmp_path / "out", allow_extrapolation=True)
    assert read_tensors(tmp_path / "out")["w"].tolist() == [1.5, 1.5, 1.5]
    with pytest.raises(MergeError, match="one output per eta"):
        liti(tmp_path / "init", tmp_path / "m", [0.1, 0.2], [tmp_path / "x"])


def test_pieces_give_the_same_result_as_whole_tensors(tmp_path):
    """A tiny buffer forces every tensor through many pieces (and SLERP through its two passes)."""
    gen = torch.Generator().manual_seed(6)
    init = {"big": torch.randn(300_001, generator=gen), "mat": torch.randn(513, 257, generator=gen), "s": torch.randn(5, generator=gen)}
    runs = [{k: v + torch.randn(v.shape, generator=gen) * 0.01 for k, v in init.items()} for _ in range(3)]
    write_checkpoint(tmp_path / "init", init)
    dirs = [write_checkpoint(tmp_path / f"r{i}", r) for i, r in enumerate(runs)]
    for small, name in ((None, "whole"), ("40KB", "pieces")):
        kw = {} if small is None else {"buffer_bytes": small}
        linear_merge(dirs, tmp_path / f"lin-{name}", **kw)
        slerp_merge(tmp_path / "init", dirs, tmp_path / f"slerp-{name}", **kw)
        liti(tmp_path / "init", dirs[0], [0.3, 0.6], [tmp_path / f"liti3-{name}", tmp_path / f"liti6-{name}"], **kw)
    for method in ("lin", "liti3", "liti6"):
        whole, pieces = read_tensors(tmp_path / f"{method}-whole"), read_tensors(tmp_path / f"{method}-pieces")
        assert all(torch.equal(whole[k], pieces[k]) for k in init), method
    whole, pieces = read_tensors(tmp_path / "slerp-whole"), read_tensors(tmp_path / "slerp-pieces")
    expected = ref_slerp_merge(init, runs)
    for k in init:  # the Gram sums run in another order: equal to rounding
        assert max_abs_diff(whole[k], pieces[k]) <= 1e-6, k
        assert max_abs_diff(whole[k], expected[k]) <= 1e-6, k


def test_bfloat16_inputs_are_averaged_in_float32_and_rounded_once(tmp_path):
    gen = torch.Generator().manual_seed(7)
    a = {"w": torch.randn(400, 300, generator=gen).bfloat16()}
    b = {"w": torch.randn(400, 300, generator=gen).bfloat16()}
    write_checkpoint(tmp_path / "a", a)
    write_checkpoint(tmp_path / "b", b)
    # weights whose products with bfloat16 values are exact in float32: the sum is rounded to
    # float32 once, then to bfloat16 once
    linear_merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out", weights=[0.25, 0.75])
    out = read_tensors(tmp_path / "out")["w"]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (a["w"].double() * 0.25 + b["w"].double() * 0.75).float().bfloat16())
    assert not torch.equal(out, a["w"] * 0.25 + b["w"] * 0.75)  # bfloat16 arithmetic would round thrice


def test_different_dtypes_need_an_explicit_output_dtype(tmp_path):
    write_checkpoint(tmp_path / "a", {"w": torch.ones(4, dtype=torch.bfloat16)})
    write_checkpoint(tmp_path / "b", {"w": torch.full((4,), 3.0)})
    with pytest.raises(IncompatibleModelsError, match=r"'w' is stored as BF16 in .*a/model.safetensors but F32 in .*b/model.safetensors.*--dtype"):
        linear_merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    linear_merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out", dtype="float32")
    assert read_tensors(tmp_path / "out")["w"].tolist() == [2.0] * 4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_non_float_tensors_are_refused(tmp_path):
    write_checkpoint(tmp_path / "a", {"ids": torch.arange(4)})
    write_checkpoint(tmp_path / "b", {"ids": torch.arange(4)})
    with pytest.raises(IncompatibleModelsError, match="'ids'.*I64; only floating-point"):
        linear_merge([tmp_path / "a", tmp_path / "b"], tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Real model directories: the merged model loads and computes what the in-memory merge computes


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A Gemma 2 init and three 'runs' (different random weights), saved as gemma_hf checkpoints."""
    root = tmp_path_factory.mktemp("runs")
    models = {name: make_ours("gemma2", seed=seed) for seed, name in enumerate(("init", "a", "b", "c"))}
    for name, model in models.items():
        model.save_pretrained(root / name)
    (root / "init" / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (root / "b" / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    return root, {name: {k: v.detach().clone() for k, v in m.state_dict().items()} for name, m in models.items()}


def _logits_of_state(state: dict, ids: torch.Tensor) -> torch.Tensor:
    model = make_ours("gemma2")
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: the head follows the embedding
    with torch.no_grad():
        return model(ids).logits


def test_merged_directories_load_and_match_the_in_memory_merge(tiny_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    import gemma_hf  # noqa: F401  (registers the gemma_hf model type)

    root, states = tiny_runs
    names = [n for n in states["init"] if n != "lm_head.weight"]
    init, runs = states["init"], [states[n] for n in ("a", "b", "c")]
    expected = {
        "slerp": ref_slerp_merge({n: init[n] for n in names}, runs),
        "linear": {n: (0.2 * runs[0][n].double() + 0.5 * runs[1][n].double() + 0.3 * runs[2][n].double()).float() for n in names},
        "liti": {n: (0.7 * init[n].double() + 0.3 * runs[0][n].double()).float() for n in names},
    }
    slerp_merge(root / "init", [root / "a", root / "b", root / "c"], tmp_path / "slerp")
    linear_merge([root / "a", root / "b", root / "c"], tmp_path / "linear", weights=[0.2, 0.5, 0.3])
    liti(root / "init", root / "a", 0.3, tmp_path / "liti")
    ids = random_ids(2, 20)
    for method, state in expected.items():
        out = tmp_path / method
        merged = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        assert type(merged).__name__ == "GemmaHFForCausalLM"
        assert merged.model.embed_tokens.weight is merged.lm_head.weight  # still tied
        with torch.no_grad():
            logits = merged(ids).logits
        assert max_abs_diff(logits, _logits_of_state(state, ids)) <= 1e-5, method
        files = {p.name for p in out.iterdir()}
        assert {"config.json", "generation_config.json", "merge.json", "model.safetensors", "modeling.py",
                "configuration.py"} <= files
        assert "lm_head.weight" not in read_tensors(out)  # tied: omitted, as save_pretrained does
    # the tokenizer of the base (slerp, liti) or first model, else of the first input that has one
    assert (tmp_path / "slerp" / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    assert (tmp_path / "linear" / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'


REMOTE_LOAD = BLOCK_GEMMA_HF_IMPORTS + textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2], weights_only=True)).logits, sys.argv[3])
    """
)


@pytest.mark.slow
def test_merged_gemma_hf_checkpoint_loads_with_remote_code_only(tiny_runs, tmp_path):
    root, states = tiny_runs
    slerp_merge(root / "init", [root / "a", root / "b"], tmp_path / "out")
    ids = random_ids(1, 12)
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "out"), str(tmp_path / "ids.pt"),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = [n for n in states["init"] if n != "lm_head.weight"]
    state = ref_slerp_merge({n: states["init"][n] for n in names}, [states["a"], states["b"]])
    assert max_abs_diff(torch.load(tmp_path / "logits.pt", weights_only=True), _logits_of_state(state, ids)) <= 1e-5


def test_sharded_inputs_and_sharded_output(tiny_runs, tmp_path):
    root, _ = tiny_runs
    for name in ("a", "b"):
        model = make_ours("gemma2", seed=("init", "a", "b").index(name))
        model.save_pretrained(tmp_path / f"{name}-sharded", max_shard_size="100KB")
        assert (tmp_path / f"{name}-sharded" / "model.safetensors.index.json").is_file()
    linear_merge([root / "a", root / "b"], tmp_path / "plain")
    linear_merge([tmp_path / "a-sharded", tmp_path / "b-sharded"], tmp_path / "from-sharded")
    linear_merge([tmp_path / "a-sharded", root / "b"], tmp_path / "mixed", max_shard_size="150KB")
    plain = read_tensors(tmp_path / "plain")
    for other in ("from-sharded", "mixed"):
        got = read_tensors(tmp_path / other)
        assert got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in plain), other
    index = json.loads((tmp_path / "mixed" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in plain.values())
    assert not (tmp_path / "mixed" / "model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed")
    state = loaded.state_dict()
    assert all(torch.equal(state[k], plain[k]) for k in plain)
    record = json.loads((tmp_path / "mixed" / "merge.json").read_text())
    assert len(record["inputs"][0]["index_sha256"]) == 64 and len(record["inputs"][0]["weight_files"]) > 1


def test_stock_transformers_checkpoints(tiny_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    root, states = tiny_runs
    for name in ("a", "b"):
        stock = stock_from(make_ours("gemma2", seed=("init", "a", "b").index(name)))
        stock.save_pretrained(tmp_path / f"stock-{name}")
    linear_merge([tmp_path / "stock-a", tmp_path / "stock-b"], tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gemma2" and "auto_map" not in config
    assert not list((tmp_path / "out").glob("*.py"))  # stock: no remote code to copy
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(merged).__name__ == "Gemma2ForCausalLM"
    ours = read_tensors(linear_merge([root / "a", root / "b"], tmp_path / "ours").outputs[0])
    assert all(torch.equal(v, ours[k]) for k, v in read_tensors(tmp_path / "out").items())
    # stock and gemma_hf checkpoints of one architecture mix; the output takes the first's config
    linear_merge([tmp_path / "stock-a", root / "b"], tmp_path / "mix")
    assert json.loads((tmp_path / "mix" / "config.json").read_text())["model_type"] == "gemma2"
    assert all(torch.equal(v, ours[k]) for k, v in read_tensors(tmp_path / "mix").items())


def _fake_run_directory(path: Path, final_seed: int, checkpoint_seed: int) -> Path:
    make_ours("gemma2", seed=final_seed).save_pretrained(path)
    (path / "recipe.yaml").write_text("model_name_or_path: x\n")
    (path / "run.json").write_text(json.dumps({"method": "sft"}))
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (path / "plots").mkdir()
    (path / "plots" / "loss.png").write_bytes(b"\x89PNG")
    make_ours("gemma2", seed=checkpoint_seed).save_pretrained(path / "checkpoints" / "checkpoint-2")
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_config.json").write_text("{}")
    save_file({"x": torch.zeros(2)}, str(path / "adapter" / "adapter_model.safetensors"))
    return path


def test_run_directory_input_merges_its_final_model(tiny_runs, tmp_path):
    root, _ = tiny_runs
    run = _fake_run_directory(tmp_path / "run", final_seed=1, checkpoint_seed=3)  # final model = "a"
    linear_merge([run, root / "b"], tmp_path / "out")
    linear_merge([root / "a", root / "b"], tmp_path / "ref")
    out, ref = read_tensors(tmp_path / "out"), read_tensors(tmp_path / "ref")
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    record = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert record["inputs"][0]["kind"] == "run directory" and record["inputs"][1]["kind"] == "checkpoint"
    assert not (tmp_path / "out" / "recipe.yaml").exists() and not (tmp_path / "out" / "run.json").exists()
    # a Trainer checkpoint of a full fine-tune is a model directory too
    linear_merge([run / "checkpoints" / "checkpoint-2", root / "b"], tmp_path / "from-checkpoint")


def test_inputs_that_are_not_models_are_refused_with_the_reason(tiny_runs, tmp_path):
    root, _ = tiny_runs
    run = _fake_run_directory(tmp_path / "run", final_seed=1, checkpoint_seed=3)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (unfinished / ".gemma-hf-run.json").write_text("{}")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(root / "a" / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(2)}, pickled / "pytorch_model.bin")
    cases = [
        (run / "adapter", "is a LoRA adapter .* not a model.*run directory's root"),
        (unfinished, "unfinished gemma-hf run.*--resume.*checkpoint-N"),
        (pickled, r"refusing pickle weights .*pytorch_model.bin.*safetensors only"),
        (tmp_path / "missing", "does not exist"),
        (root / "a" / "model.safetensors", "is a file; merging takes model directories"),
        (tmp_path, "not a model directory: it has no config.json"),
    ]
    for bad, message in cases:
        with pytest.raises(MergeError, match=message):
            linear_merge([root / "a", bad], tmp_path / "out")
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Mismatches, non-finite values, atomicity, output guards


def test_mismatches_name_the_first_difference_and_write_nothing(tmp_path):
    a = write_checkpoint(tmp_path / "a", {"t0": torch.zeros(4), "t1": torch.zeros(2, 3)})
    cases = [
        (write_checkpoint(tmp_path / "shape", {"t0": torch.zeros(4), "t1": torch.zeros(3, 2)}),
         r"tensor 't1' has shape \(2, 3\) in .*a/model.safetensors but \(3, 2\) in .*shape/model.safetensors"),
        (write_checkpoint(tmp_path / "names", {"t0": torch.zeros(4), "t2": torch.zeros(2, 3)}),
         r"different tensors \(2 names differ\): tensor 't1' is in .*a/model.safetensors but not in .*names"),
        (write_checkpoint(tmp_path / "arch", {"t0": torch.zeros(4), "t1": torch.zeros(2, 3)}, hidden_size=32),
         r"different architectures: hidden_size is 64 in .*a/config.json but 32 in .*arch/config.json"),
        (write_checkpoint(tmp_path / "family", {"t0": torch.zeros(4), "t1": torch.zeros(2, 3)}, variant="gemma2"),
         r"different architectures: family is 'gemma' in .*a/config.json but 'gemma2'"),
    ]
    base = Path(shutil.copytree(a, tmp_path / "copy" / "a"))  # a copy: the base itself is refused as a model
    for other, message in cases:
        for merge in (lambda: linear_merge([a, other], tmp_path / "out"),
                      lambda: slerp_merge(base, [a, other], tmp_path / "out"),
                      lambda: liti(a, other, 0.5, tmp_path / "out")):
            with pytest.raises(IncompatibleModelsError, match=message):
                merge()
            assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_tied_head_is_ignored_consistently(tmp_path):
    embed = torch.randn(5, 3)
    a = write_checkpoint(tmp_path / "a", {"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone()})
    b = write_checkpoint(tmp_path / "b", {"model.embed_tokens.weight": embed * 2})
    linear_merge([a, b], tmp_path / "out")
    assert set(read_tensors(tmp_path / "out")) == {"model.embed_tokens.weight"}
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["inputs"][0]["ignored_tied_tensors"] == ["lm_head.weight"]
    # untied: the head is a tensor of its own and must be in every input
    ua = write_checkpoint(tmp_path / "ua", {"model.embed_tokens.weight": embed, "lm_head.weight": embed.clone()}, tie_word_embeddings=False)
    ub = write_checkpoint(tmp_path / "ub", {"model.embed_tokens.weight": embed}, tie_word_embeddings=False)
    with pytest.raises(IncompatibleModelsError, match="'lm_head.weight' is in .*ua/model.safetensors but not in"):
        linear_merge([ua, ub], tmp_path / "out2")


def test_non_finite_values_stop_the_merge_and_leave_no_output(tmp_path):
    good = {f"t{i}": torch.ones(8) for i in range(5)}
    bad = dict(good, t3=torch.tensor([1.0, float("nan"), 1, 1, 1, 1, 1, 1]))
    a = write_checkpoint(tmp_path / "a", good)
    b = write_checkpoint(tmp_path / "b", bad)
    base = Path(shutil.copytree(a, tmp_path / "copy" / "a"))  # a copy: the base itself is refused as a model
    for merge in (lambda: linear_merge([a, b], tmp_path / "out"), lambda: slerp_merge(base, [a, b], tmp_path / "out"),
                  lambda: liti(a, b, 0.0, tmp_path / "out")):  # even with weight 0 on the NaN
        with pytest.raises(NonFiniteError, match=r"tensor 't3' in .*b/model.safetensors holds NaN or Inf"):
            merge()
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # finite inputs whose merge overflows the storage dtype
    h1 = write_checkpoint(tmp_path / "h1", {"w": torch.zeros(4, dtype=torch.float16)})
    h2 = write_checkpoint(tmp_path / "h2", {"w": torch.full((4,), 60000.0, dtype=torch.float16)})
    with pytest.raises(NonFiniteError, match="'w' is not finite: it overflows torch.float16"):
        liti(h1, h2, 2.0, tmp_path / "out", allow_extrapolation=True)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_failure_mid_merge_leaves_no_output(tiny_runs, tmp_path, monkeypatch, capsys):
    root, _ = tiny_runs
    calls = {"n": 0}
    original = safetensors_stream.ShardWriter.write

    def disk_full_after_some_tensors(self, name, piece):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return original(self, name, piece)

    monkeypatch.setattr(safetensors_stream.ShardWriter, "write", disk_full_after_some_tensors)
    with pytest.raises(OSError, match="No space left"):
        slerp_merge(root / "init", [root / "a", root / "b"], tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    # replacing an existing output (an earlier model): a failure keeps the old one untouched
    shutil.copytree(root / "c", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls["n"] = 0
    with pytest.raises(OSError):
        slerp_merge(root / "init", [root / "a", root / "b"], tmp_path / "out", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before and leftovers(tmp_path) == []
    # the command line: a failure while writing exits 1, with the reason and no traceback
    calls["n"] = 0
    code, _, err = run_cli(["merge", "--method", "linear", "--models", str(root / "a"), str(root / "b"),
                            "--output", str(tmp_path / "cli")], capsys)
    assert code == 1 and "No space left on device" in err and "nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "cli").exists() and leftovers(tmp_path) == []


def test_output_guards(tiny_runs, tmp_path):
    root, _ = tiny_runs
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match="already exists; pass --overwrite"):
        linear_merge([root / "a", root / "b"], tmp_path / "out")
    linear_merge([root / "a", root / "b"], tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(MergeError, match="is an input"):
        linear_merge([root / "a", root / "b"], root / "a", overwrite=True)
    with pytest.raises(MergeError, match="inside the input"):
        linear_merge([root / "a", root / "b"], root / "a" / "merged")
    inner = tmp_path / "out" / "inner"
    make_ours("gemma2", seed=2).save_pretrained(inner)
    with pytest.raises(MergeError, match="would delete the input"):
        linear_merge([root / "a", inner], tmp_path / "out", overwrite=True)
    with pytest.raises(MergeError, match="same output directory is given twice"):
        liti(root / "init", root / "a", [0.1, 0.2], [tmp_path / "x", tmp_path / "x"])


# ---------------------------------------------------------------------------------------------
# Memory: independent of the model size and of the number of inputs

MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, re, sys, threading, time
    from pathlib import Path
    from gemma_hf.merging import linear_merge, slerp_merge

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    root = Path(sys.argv[1])
    # warm up every code path on a tiny copy: imports and first-call allocations go into the baseline
    slerp_merge(root / "tiny0", [root / "tiny1", root / "tiny2"], root / "warm1")
    linear_merge([root / "tiny1", root / "tiny2"], root / "warm2")
    # The peak is the kernel's high-water mark, reset here. (getrusage's ru_maxrss cannot be reset,
    # and a child started by fork + exec inherits its parent's peak into it.)
    try:
        open("/proc/self/clear_refs", "w").write("5")
        sampler = None
    except OSError:  # no reset: sample the resident set instead
        peak, stop = [0], threading.Event()
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], status("VmRSS"))
                time.sleep(0.002)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    baseline = status("VmRSS")
    models = sorted(p for p in root.iterdir() if p.name.startswith("ckpt"))
    s = slerp_merge(models[0], models[1:], root / "slerp")
    l = linear_merge(models, root / "linear")
    if sampler is None:
        top = status("VmHWM")
    else:
        stop.set(); sampler.join(); top = peak[0]
    print(s.summary()); print(l.summary())
    print(json.dumps({"growth": top - baseline, "read": s.bytes_read + l.bytes_read}))
    """
)


@pytest.mark.slow
def test_memory_does_not_grow_with_model_size_or_input_count(tmp_path):
    """Six checkpoints of ~160 MB (129 tensors, one of 32 MB): SLERP of 5 runs and a linear merge of
    6 in one process grow its peak RSS by less than one checkpoint. Loading one whole model (as any
    implementation that is not streaming must, and then some) would exceed that."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (8192, 1024), **{f"model.layers.{i}.w": (512, 512) for i in range(128)}}
    ckpt_bytes = sum(math.prod(s) * 4 for s in shapes.values())
    try:
        for i in range(6):
            write_checkpoint(tmp_path / f"ckpt{i}", {n: torch.randn(s, generator=gen) for n, s in shapes.items()})
        for i in range(3):
            write_checkpoint(tmp_path / f"tiny{i}", {n: torch.randn(s[0] // 64, generator=gen) for n, s in shapes.items()})
        result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["read"] >= 12 * ckpt_bytes  # everything was read (the 32 MB tensor twice by SLERP)
        assert report["growth"] < ckpt_bytes, f"peak RSS grew by {report['growth'] / 1e6:.0f} MB; one checkpoint is {ckpt_bytes / 1e6:.0f} MB"
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_merges_with_each_method(tiny_runs, tmp_path, capsys):
    root, _ = tiny_runs
    code, out, err = run_cli(["merge", "--method", "linear", "--models", str(root / "a"), str(root / "b"),
                              "--weights", "0.25", "0.75", "--output", str(tmp_path / "lin")], capsys)
    assert code == 0, err
    assert out.startswith("merged 2 checkpoints: linear: ") and "tensors" in out and "GB/s" in out
    code, out, err = run_cli(["merge", "--method", "slerp", "--base", str(root / "init"), "--models", str(root / "a"),
                              str(root / "b"), str(root / "c"), "--output", str(tmp_path / "slerp")], capsys)
    assert code == 0, err
    assert out.startswith("merged 4 checkpoints: slerp: ")
    code, out, err = run_cli(["merge", "--method", "liti", "--base", str(root / "init"), "--models", str(root / "a"),
                              "--eta", "0.3", "--output", str(tmp_path / "liti")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "liti" / "merge.json").read_text())["eta"] == 0.3
    code, _, err = run_cli(["merge", "--method", "linear", "--models", str(root / "a"), str(root / "b"),
                            "--weights", "1", "3", "--normalize", "--dtype", "bfloat16", "--output", str(tmp_path / "n")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "n" / "merge.json").read_text())["weights"] == [0.25, 0.75]
    assert read_tensors(tmp_path / "n")["model.norm.weight"].dtype == torch.bfloat16


def test_cli_errors_exit_2_with_one_line(tiny_runs, tmp_path, capsys):
    root, _ = tiny_runs
    a, b, init = str(root / "a"), str(root / "b"), str(root / "init")
    out = str(tmp_path / "out")
    cases = [
        (["--method", "slerp", "--base", init, "--models", a, b, "--weights", "0.5", "0.5"], "--weights and --normalize apply to --method linear only"),
        (["--method", "slerp", "--models", a, b], "needs --base INIT"),
        (["--method", "liti", "--base", init, "--models", a, b, "--eta", "0.3"], "exactly one model"),
        (["--method", "liti", "--base", init, "--models", a], "needs --eta"),
        (["--method", "liti", "--base", init, "--models", a, "--eta", "-0.1"], "finite number >= 0"),
        (["--method", "linear", "--models", a], "two or more --models"),
        (["--method", "linear", "--models", a, b, "--weights", "0.5", "0.6"], "sum to 1.1, not 1"),
        (["--method", "linear", "--models", a, b, "--weights", "0.5"], "one weight per model"),
        (["--method", "linear", "--base", init, "--models", a, b], "--base applies to --method slerp and liti"),
        (["--method", "linear", "--models", a, str(tmp_path / "nope")], "does not exist"),
        (["--method", "linear", "--models", a, b, "--max-shard-size", "lots"], "cannot read a size"),
    ]
    for argv, message in cases:
        code, stdout, err = run_cli(["merge", *argv, "--output", out], capsys)
        assert code == 2, (argv, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(["merge", "--method", "linear", "--models", a, b, "--output", out], capsys)
    assert code == 2 and "already exists; pass --overwrite" in err


def test_overwrite_never_deletes_what_is_not_a_model(tiny_runs, tmp_path, capsys):
    """--overwrite replaces an empty or a model directory only: a directory of the user's own files or
    a training run is refused (exit 2, the files named, no --overwrite hint), and nothing is touched."""
    root, _ = tiny_runs
    a, b = str(root / "a"), str(root / "b")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "data").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "model.safetensors").write_bytes(b"x")
    (run / "run.json").write_text("{}")
    for out, named in ((mine, "not a model directory (data, notes.txt)"), (run, "is a gemma-hf run directory")):
        for flags in ([], ["--overwrite"]):
            code, _, err = run_cli(["merge", "--method", "linear", "--models", a, b, "--output", str(out), *flags],
                                   capsys)
            assert code == 2 and named in err and "pass --overwrite" not in err and "Traceback" not in err, err
            assert ("even with --overwrite" in err) == bool(flags)
    assert (mine / "notes.txt").read_text() == "my notes" and (mine / "data").is_dir()
    assert (run / "run.json").is_file() and (run / "model.safetensors").read_bytes() == b"x"
    # A model directory (an earlier merge) is replaced, as before.
    assert run_cli(["merge", "--method", "linear", "--models", a, b, "--output", str(tmp_path / "m")], capsys)[0] == 0
    assert run_cli(["merge", "--method", "linear", "--models", a, b, "--output", str(tmp_path / "m"),
                    "--overwrite"], capsys)[0] == 0
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Issue 22: an input given twice, or the base as a model, and numbers out of range -- exit 2,
# the option named, nothing written


@pytest.fixture
def spelled(tiny_runs, tmp_path, monkeypatch):
    """A working directory holding copies of tiny_runs' init, a and b (so ./a, a/ and a are one
    directory), plus other names for them: symbolic links to the directories, and directories
    whose weight file is a link (symbolic or hard) to a's. The working directory is the cwd."""
    root, _ = tiny_runs
    work = tmp_path / "work"
    work.mkdir()
    for name in ("init", "a", "b", "c"):
        shutil.copytree(root / name, work / name)
    (work / "link-to-a").symlink_to(work / "a", target_is_directory=True)
    (work / "link-to-init").symlink_to(work / "init", target_is_directory=True)
    for name, link in (("symlinked-weights-of-a", os.symlink), ("hardlinked-weights-of-a", os.link)):
        (work / name).mkdir()
        shutil.copyfile(work / "a" / "config.json", work / name / "config.json")
        link(work / "a" / "model.safetensors", work / name / "model.safetensors")
    monkeypatch.chdir(work)
    return work


def _nothing_written(work: Path, out: Path) -> None:
    assert not out.exists(), "an output was written"
    stray = [p for p in work.parent.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert stray == [], stray


SAME_MODEL_CASES = {
    # slerp: a model that is the base has a zero task vector
    "slerp: base among models": (
        ["--method", "slerp", "--base", "init", "--models", "a", "init"],
        ["the 2nd of --models ('init') is the --base 'init' itself", "task vector", "is zero",
         "Remove it from --models"]),
    "slerp: base spelled ./init/": (
        ["--method", "slerp", "--base", "init", "--models", "./init/", "a"],
        ["the 1st of --models ('./init/') is the --base 'init' itself", "both are the directory"]),
    "slerp: base through a symlink": (
        ["--method", "slerp", "--base", "link-to-init", "--models", "a", "init/"],
        ["the 2nd of --models ('init/') is the --base 'link-to-init' itself"]),
    "slerp: a run twice": (
        ["--method", "slerp", "--base", "init", "--models", "a", "b", "./a"],
        ["the 3rd of --models ('./a') is the same model as the 1st of --models ('a')", "list each run once"]),
    # liti: the model is the base
    "liti: model is the base": (
        ["--method", "liti", "--base", "init", "--models", "init/", "--eta", "0.3"],
        ["--models 'init/' is the --base 'init' itself", "gives the base at every eta"]),
    "liti: model is a symlink to the base": (
        ["--method", "liti", "--base", "./init", "--models", "link-to-init", "--eta", "0.3"],
        ["--models 'link-to-init' is the --base './init' itself"]),
    # linear: the same model twice
    "linear: a a": (
        ["--method", "linear", "--models", "a", "a"],
        ["the 2nd of --models ('a') is the same model as the 1st of --models ('a')", "--weights"]),
    "linear: ./a a/": (
        ["--method", "linear", "--models", "./a", "b", "a/", "--weights", "0.25", "0.5", "0.25"],
        ["the 3rd of --models ('a/') is the same model as the 1st of --models ('./a')",
         "give it a larger share with --weights"]),
    "linear: a and a symlink to it": (
        ["--method", "linear", "--models", "link-to-a", "a"],
        ["the 2nd of --models ('a') is the same model as the 1st of --models ('link-to-a')"]),
    "linear: a directory whose weights are a symlink to a's": (
        ["--method", "linear", "--models", "a", "b", "symlinked-weights-of-a"],
        ["the 3rd of --models ('symlinked-weights-of-a') is the same model as the 1st of --models ('a')",
         "holds the very weight files of", "model.safetensors, linked"]),
    "linear: a directory whose weights are a hard link to a's": (
        ["--method", "linear", "--models", "hardlinked-weights-of-a", "a"],
        ["the 2nd of --models ('a') is the same model as the 1st of --models ('hardlinked-weights-of-a')"]),
}


@pytest.mark.parametrize("argv, messages", SAME_MODEL_CASES.values(), ids=SAME_MODEL_CASES.keys())
def test_an_input_given_twice_or_the_base_as_a_model_is_refused(spelled, argv, messages, capsys):
    """Identity is the resolved directory or the weight files themselves (links of either kind);
    every spelling of one model counts as that model. Exit 2, the option and both spellings named,
    one line, no traceback, nothing written."""
    out = spelled / "out"
    code, stdout, err = run_cli(["merge", *argv, "--output", str(out)], capsys)
    assert code == 2, err
    for message in messages:
        assert message in err, (message, err)
    assert "Traceback" not in err and "unexpected" not in err and len(err.strip().splitlines()) == 1, err
    assert stdout == ""
    _nothing_written(spelled, out)


def test_the_library_refuses_the_same_model_twice_too(spelled):
    """The checks are the merge functions' own: every caller (WARP's stages included) gets them;
    a copy in another directory is another model (test_slerp_of_a_model_with_itself_is_that_model)."""
    out = spelled / "out"
    with pytest.raises(MergeError, match=r"the 2nd of --models \('./a'\) is the same model as the 1st"):
        linear_merge(["a", "./a"], out)
    with pytest.raises(MergeError, match=r"the 1st of --models \('init'\) is the --base 'link-to-init' itself"):
        slerp_merge("link-to-init", ["init", "a"], out)
    with pytest.raises(MergeError, match=r"--models 'init/' is the --base 'init' itself"):
        liti("init", "init/", [0.1, 0.5], [spelled / "o1", spelled / "o2"])
    with pytest.raises(MergeError, match="eta=0.5 twice"):
        liti("init", "a", [0.5, 0.5], [spelled / "o1", spelled / "o2"])
    for path in (out, spelled / "o1", spelled / "o2"):
        _nothing_written(spelled, path)


NUMBER_CASES = {
    # --weights: finite, a representable sum, each weight used within float32's range
    "weights 1e308 1e308 --normalize": (
        ["--method", "linear", "--models", "a", "b", "--weights", "1e308", "1e308", "--normalize"],
        "--weights 1e+308 1e+308 sum to more than the largest float"),
    "weights 1e308 1e308": (
        ["--method", "linear", "--models", "a", "b", "--weights", "1e308", "1e308"],
        "--weights 1e+308 1e+308 sum to more than the largest float"),
    "weights inf": (
        ["--method", "linear", "--models", "a", "b", "--weights", "inf", "1", "--normalize"],
        "--weights must be finite numbers, got inf"),
    "weights nan": (
        ["--method", "linear", "--models", "a", "b", "--weights", "nan", "1"],
        "--weights must be finite numbers, got nan"),
    "normalised weight beyond float32": (
        ["--method", "linear", "--models", "a", "b", "c", "--weights", "1" + "0" * 30, "-1" + "0" * 30,
         "0.0000000001", "--normalize", "--allow-extrapolation"],
        "the 1st of --weights (normalised) is 1e+40, beyond the largest float32"),
    "weight below float32": (
        ["--method", "linear", "--models", "a", "b", "--weights", "1", "1e-50"],
        "the 2nd of --weights is 1e-50, below the smallest normal float32"),
    "normalised weight below float32": (
        ["--method", "linear", "--models", "a", "b", "--weights", "1", "1e-50", "--normalize"],
        "the 2nd of --weights (normalised) is 1e-50, below the smallest normal float32"),
    # --eta: [0, 1], or float32's range with --allow-extrapolation
    "eta 1e300": (
        ["--method", "liti", "--base", "init", "--models", "a", "--eta", "1e300", "--allow-extrapolation"],
        "--eta is 1e+300, beyond the largest float32"),
    "eta 1e-50": (
        ["--method", "liti", "--base", "init", "--models", "a", "--eta", "1e-50"],
        "--eta is 1e-50, below the smallest normal float32"),
    "eta inf": (
        ["--method", "liti", "--base", "init", "--models", "a", "--eta", "inf", "--allow-extrapolation"],
        "--eta must be a finite number >= 0, got inf"),
    "eta nan": (
        ["--method", "liti", "--base", "init", "--models", "a", "--eta", "nan"],
        "--eta must be a finite number >= 0, got nan"),
    # the working options: refused, never silently replaced by the default
    "threads 0": (["--method", "linear", "--models", "a", "b", "--threads", "0"],
                  "--threads must be a whole number from 1 to"),
    "threads -1": (["--method", "linear", "--models", "a", "b", "--threads", "-1"],
                   "--threads must be a whole number from 1 to"),
    "threads 100000": (["--method", "linear", "--models", "a", "b", "--threads", "100000"],
                       "--threads must be a whole number from 1 to"),
    "buffer-size infGB": (["--method", "linear", "--models", "a", "b", "--buffer-size", "infGB"],
                          "--buffer-size: cannot read a size from 'infGB'"),
    "buffer-size empty": (["--method", "linear", "--models", "a", "b", "--buffer-size", ""],
                          "--buffer-size: cannot read a size from ''"),
    "buffer-size 0": (["--method", "linear", "--models", "a", "b", "--buffer-size", "0"],
                      "--buffer-size: a size must be positive"),
    "max-shard-size 1e400GB": (["--method", "linear", "--models", "a", "b", "--max-shard-size", "1e400GB"],
                               "--max-shard-size: cannot read a size from '1e400GB'"),
    # options that cannot have an effect
    "normalize without weights": (["--method", "linear", "--models", "a", "b", "--normalize"],
                                  "--normalize has no effect without --weights"),
    "allow-extrapolation without weights": (["--method", "linear", "--models", "a", "b", "--allow-extrapolation"],
                                            "--allow-extrapolation has no effect without --weights"),
    "allow-extrapolation with slerp": (
        ["--method", "slerp", "--base", "init", "--models", "a", "b", "--allow-extrapolation"],
        "--allow-extrapolation has no effect with --method slerp"),
}


@pytest.mark.parametrize("argv, message", NUMBER_CASES.values(), ids=NUMBER_CASES.keys())
def test_numbers_out_of_range_and_options_without_effect_exit_2(spelled, argv, message, capsys):
    out = spelled / "out"
    code, stdout, err = run_cli(["merge", *argv, "--output", str(out)], capsys)
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err and "unexpected" not in err and len(err.strip().splitlines()) == 1, err
    _nothing_written(spelled, out)


def test_the_weight_and_eta_ranges_in_the_library():
    with pytest.raises(ValueError, match="sum to more than the largest float"):
        check_weights([1e308, 1e308], 2, normalize=True)
    assert check_weights([1e300, 3e300], 2, normalize=True) == [0.25, 0.75]  # large, but a usable sum
    with pytest.raises(ValueError, match=r"1st of --weights \(normalised\) is 1e\+40, beyond the largest float32"):
        check_weights([1e30, -1e30, 1e-10], 3, normalize=True, allow_extrapolation=True)
    assert check_weights([1.0, 0.0], 2) == [1.0, 0.0]  # 0 is a weight (the model counts for nothing, as asked)
    with pytest.raises(ValueError, match="below the smallest normal float32"):
        check_weights([1.0, 1e-40], 2)
    with pytest.raises(ValueError, match="--eta is 1e\\+39, beyond"):
        check_eta(1e39, allow_extrapolation=True)
    with pytest.raises(ValueError, match="--eta is 1e-40, below"):
        check_eta(1e-40)
    assert check_eta(1e30, allow_extrapolation=True) == 1e30


def test_options_without_effect_for_these_values_are_warned_about(spelled, capsys):
    code, _, err = run_cli(["merge", "--method", "linear", "--models", "a", "b", "--weights", "0.25", "0.75",
                            "--normalize", "--allow-extrapolation", "--output", "lin"], capsys)
    assert code == 0, err
    assert "warning: --allow-extrapolation has no effect: no weight in --weights is negative." in err
    assert "warning: --normalize has no effect: --weights already sum to 1." in err
    code, _, err = run_cli(["merge", "--method", "liti", "--base", "init", "--models", "a", "--eta", "0.3",
                            "--allow-extrapolation", "--output", "liti"], capsys)
    assert code == 0, err
    assert "warning: --allow-extrapolation has no effect: --eta 0.3 is within [0, 1]." in err
