"""Gemma building blocks: RMSNorm (1 + w, fp32), GeGLU MLP, scaled embedding, rotary embedding.

Each block is written so that its numerics match the reports and stock transformers bit for bit
in fp32; the comments name the traps each one avoids.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration import FULL, SLIDING, GemmaHFConfig


class GemmaRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), computed in fp32 and cast back at the end.

    The weight is stored zero-centred (1 + w), as in the original checkpoints. Casting to the
    input dtype happens after the multiplication by (1 + w): casting before it (the Llama order)
    loses precision in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


# Row-split decoding products (GemmaLinear). Products of at most SPLIT_MAX_ROWS rows with a weight of
# at least SPLIT_MIN_NUMEL elements, fp32, on CPU, without autograd, are split; the verdict of each
# shape's bit check is kept in _SPLIT_EXACT.
SPLIT_MAX_ROWS = 64
SPLIT_MIN_NUMEL = 1 << 17
_SPLIT_EXACT: dict[tuple, bool] = {}


class GemmaLinear(nn.Linear):
    """nn.Linear (same parameters, same state dict, same results bit for bit) with a faster CPU
    decode path.

    While decoding, a projection multiplies one row per sequence by the whole weight: memory-bound
    work that MKL does on ONE thread in fp32 whatever torch's thread count (measured on the real
    Gemma 3 270M: the 262144 x 640 head at ~12 GB/s of the machine's ~28 GB/s). Here the weight's
    output rows are cut into P equal blocks (P = torch's thread count, at most 8) that one
    ``torch.bmm`` computes, and torch parallelises a batched product over its batch: every core
    streams its block. The first time a (rows, shape, P) product is met, the split result is
    compared with F.linear bit for bit and the split is used only if they are equal (MKL picks its
    kernel by shape and thread count, not by values; measured: 5- and 7-row products differ, 1-4, 8,
    16, 32 and 64 rows do not).

    Used only where it cannot change anything else: fp32 weight and input on CPU, no bias, no
    autograd (``torch.no_grad``/``inference_mode``: generation, evaluation), plain tensors (not a
    DTensor or a quantised weight), not while torch.compile traces. bench/run.py (generate) measures
    it against stock transformers. Relies on torch.bmm parallelising over the batch dimension on CPU
    (ATen's CPU bmm, torch 2.x): if a torch upgrade stops doing so it is merely slower, never wrong.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type != "cpu" or w.dtype != torch.float32 or x.dtype != torch.float32 or self.bias is not None
                or torch.is_grad_enabled() or w.numel() < SPLIT_MIN_NUMEL or type(x) is not torch.Tensor
                or type(w) not in (nn.Parameter, torch.Tensor) or not w.is_contiguous()
                or torch.compiler.is_compiling()):
            return super().forward(x)
        n, k = w.shape
        rows = x.numel() // k if k else 0
        parts = _split_parts(n)
        if not 0 < rows <= SPLIT_MAX_ROWS or parts < 2:
            return super().forward(x)
        key = (rows, n, k, parts)
        exact = _SPLIT_EXACT.get(key)
        if exact is False:
            return super().forward(x)
        x2 = x.reshape(rows, k)
        y = torch.bmm(x2.unsqueeze(0).expand(parts, rows, k), w.view(parts, n // parts, k).transpose(1, 2))
        y = y.transpose(0, 1).reshape(*x.shape[:-1], n)
        if exact is None:
            reference = super().forward(x)
            _SPLIT_EXACT[key] = exact = torch.equal(y, reference)
            if not exact:
                return reference
        return y


def _split_parts(n: int) -> int:
    """Blocks of a weight with n output rows: torch's thread count (at most 8), dividing n, >= 64 rows."""
    parts = min(torch.get_num_threads(), 8)
    while parts >= 2 and (n % parts or n // parts < 64):
        parts -= 1
    return parts


class GemmaMLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, config: GemmaHFConfig):
        super().__init__()
        self.gate_proj = GemmaLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = GemmaLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = GemmaLinear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GemmaScaledEmbedding(nn.Embedding):
    """Token embedding multiplied by sqrt(hidden_size).

    The scale is cast to the weight dtype before multiplying, as the original implementation
    does: in bf16, sqrt(3072) = 55.43 becomes 55.5, and the checkpoints were trained that way.
    `embed_scale` is a non-persistent buffer, so `_init_weights` must re-create it after
    `from_pretrained` materialises the model from the meta device.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.scale_value = float(embedding_dim) ** 0.5
        self.register_buffer("embed_scale", torch.tensor(self.scale_value), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale.to(self.weight.dtype)


def rope_inv_freq(base: float, head_dim: int, linear_factor: float = 1.0) -> torch.Tensor:
    """Inverse RoPE frequencies base^(-2i/d), in fp32; linear scaling divides them by the factor."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base**exponents) / linear_factor


class GemmaRotaryEmbedding(nn.Module):
    """cos/sin tables for each layer type (Gemma 3 uses two RoPE bases: local and global).

    Angles are computed in fp32 whatever the model dtype and only the result is cast: computing
    position * inv_freq in bf16 destroys long-context positions.
    """

    def __init__(self, config: GemmaHFConfig):
        super().__init__()
        self.config = config
        self.layer_types = sorted(set(config.layer_types))
        for layer_type in self.layer_types:
            self.register_buffer(f"{layer_type}_inv_freq", self._inv_freq(layer_type), persistent=False)

    def _inv_freq(self, layer_type: str) -> torch.Tensor:
        config = self.config
        if layer_type == SLIDING:
            return rope_inv_freq(config.local_rope_theta, config.head_dim)
        factor = float(config.rope_linear_factor) if config.rope_linear_factor else 1.0
        return rope_inv_freq(config.rope_theta, config.head_dim, factor)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str = FULL):
        inv_freq = getattr(self, f"{layer_type}_inv_freq").to(device=x.device, dtype=torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq
            angles = torch.cat((freqs, freqs), dim=-1)
            cos, sin = angles.cos(), angles.sin()
        return cos.to(x.dtype), sin.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q and k ([batch, heads, seq, head_dim]) by cos/sin ([batch, seq, head_dim])."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
