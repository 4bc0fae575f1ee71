"""GemmaLinear's decode path (row-split products on CPU, gemma_hf.model.layers): the same bits as
nn.Linear, used only where it applies, and a model that uses it still generates what stock does."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gemma_hf.model import layers
from gemma_hf.model.layers import GemmaLinear
from tiny import make_pair, random_ids


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    layers._SPLIT_EXACT.clear()
    yield
    torch.set_num_threads(before)
    layers._SPLIT_EXACT.clear()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 16, 64, 65])
def test_split_products_equal_nn_linear_bit_for_bit(two_threads, rows):
    torch.manual_seed(rows)
    linear = GemmaLinear(640, 4096, bias=False)
    x = torch.randn(1, rows, 640)
    with torch.no_grad():
        first, second = linear(x), linear(x)  # the first call checks the shape, the second uses the verdict
        reference = F.linear(x, linear.weight)
    assert torch.equal(first, reference) and torch.equal(second, reference)
    checked = {key: ok for key, ok in layers._SPLIT_EXACT.items() if key[0] == rows}
    assert (rows > layers.SPLIT_MAX_ROWS) == (not checked)  # checked (then used or not) iff it applies


def test_split_path_is_taken_and_gradients_untouched(two_threads):
    linear = GemmaLinear(640, 4096, bias=False)
    x = torch.randn(1, 640, requires_grad=True)
    y = linear(x)  # autograd on: the stock path, nothing checked
    assert not layers._SPLIT_EXACT and y.grad_fn is not None
    y.sum().backward()
    plain = torch.nn.Linear(640, 4096, bias=False)
    plain.weight = linear.weight
    x2 = x.detach().clone().requires_grad_(True)
    plain(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    with torch.no_grad():
        linear(x)
    assert layers._SPLIT_EXACT == {(1, 4096, 640, 2): True}  # one-row products split exactly here


def test_not_split_on_one_thread_bf16_bias_or_small_weights(two_threads):
    cases = [(GemmaLinear(640, 64, bias=False), torch.float32),  # 40960 elements: too small
             (GemmaLinear(640, 4096, bias=True), torch.float32),
             (GemmaLinear(640, 4096, bias=False), torch.bfloat16)]
    with torch.no_grad():
        for linear, dtype in cases:
            linear.to(dtype)(torch.randn(1, 640, dtype=dtype))
        torch.set_num_threads(1)
        GemmaLinear(640, 4096, bias=False)(torch.randn(1, 640))
    assert not layers._SPLIT_EXACT


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_generation_with_split_products_matches_stock(two_threads, variant):
    # vocab 2048 x hidden 64 = 131072 elements: the head's products take the split path
    ours, stock = make_pair(variant, vocab_size=2048)
    assert isinstance(ours.lm_head, GemmaLinear)
    ids = random_ids(3, 5, vocab=2048)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        a = ours.generate(ids, **kwargs)
        b = stock.generate(ids, **kwargs)
    assert any(key[1] == 2048 for key in layers._SPLIT_EXACT), layers._SPLIT_EXACT
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))


def test_split_blocks_divide_the_rows_into_blocks_of_64_or_more(two_threads):
    """P blocks only when P divides the rows and each block keeps >= 64 rows; else fewer (1: not split)."""
    assert layers._split_parts(128) == 2 and layers._split_parts(262144) == 2
    assert layers._split_parts(129) == 1  # odd: no two equal blocks
    assert layers._split_parts(100) == 1  # two blocks of 50 rows are too small
