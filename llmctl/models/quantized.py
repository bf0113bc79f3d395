"""Quantized `gpt` models at run time: the modules, and how to rebuild a model from a model dir's tensors.

A quantized model is a plain `GPT` whose decoder Linear layers, token embedding and output head are
swapped for the modules below, with `model.quantization` set to config.json's "quantization" entry.
`llmctl.compression.quantization` makes them from float weights; this module only runs and rebuilds
them, so loading a model never imports the compression code. The schemes:

- "int8": int8 weights, one float32 scale per output row (symmetric); activations quantized to 8
  bits per tensor at run time (fbgemm's dynamic linear): the fast CPU path.
- "int8-weight": the same int8 weights; activations stay float and multiply in bfloat16.
- "int4-weight": 4-bit weights in groups of `group_size` inputs, each group with a bfloat16 scale
  and offset; bfloat16 compute. The embedding and the output head stay int8 ("int8-weight").

The token embedding is int8 with one scale per row in every scheme, and a tied output head uses
those very tensors, so model.safetensors stores them once. Its tensors, for a layer named P:

    P.weight         int8  (out, in)                     weight = q * scale
    P.weight_scale   float32 (out,)
  int4-weight:
    P.weight         uint8 (out, in_padded / 2)          two 4-bit q a byte, the lower column in the low nibble
    P.weight_scale   bfloat16 (out, in_padded / group_size)
    P.weight_zero    bfloat16 (out, in_padded / group_size)   weight = (q - 8) * scale + zero

`in_padded` is `in` rounded up to a whole group; the padding columns hold zeros.
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEMES = ("int8", "int8-weight", "int4-weight")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts

# Up to this many rows (tokens) torch's int8 weight-only kernel beats dequantizing the weight and
# running a bfloat16 matmul; measured crossover on 2 AVX-512 cores: 32-64 rows.
_INT8_PACKED_KERNEL_MAX_ROWS = 32


class Int8Embedding(nn.Module):
    """Token embedding stored as int8 rows with one float32 scale per row."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)  # int8 (V, C)
        self.register_buffer("weight_scale", weight_scale)  # float32 (V,)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.weight)  # (B, T, C) int8
        return rows.float() * self.weight_scale[input_ids].unsqueeze(-1)  # (B, T, C)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]  # (V, C)


class DynamicInt8Linear(nn.Module):
    """Scheme "int8": int8 weights per output row, activations quantized per tensor at run time.

    Runs fbgemm's packed int8 GEMM (`quantized::linear_dynamic`); the packed copy is made once here
    and is not part of the state dict. `bias` (float32, the classifiers' heads have one) is added in
    float by the same kernel.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # int8 (N, K)
        self.register_buffer("weight_scale", weight_scale)  # float32 (N,)
        if bias is not None:
            self.register_buffer("bias", bias)  # float32 (N,)
        else:
            self.bias = None
        self._packed = torch.ops.quantized.linear_prepack(per_row_qint8(weight, weight_scale), bias)
        self._reduce_range = activations_need_reduced_range()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self._packed, self._reduce_range)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]  # (N, K)


class Int8WeightOnlyLinear(nn.Module):
    """Scheme "int8-weight": int8 weights per output row; activations stay float, multiplied in bfloat16.

    Few rows (decoding) go through torch's int8 weight-only kernel; many rows (a prompt, an eval
    batch) through a bfloat16 matmul on the weight dequantized for that call, which is faster there.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", aligned(weight))  # int8 (N, K)
        self.register_buffer("weight_scale", weight_scale)  # float32 (N,)
        self._scale_bf16 = weight_scale.to(torch.bfloat16)
        # The kernel reads K in blocks of 8 and crashes (not raises) on other widths.
        self._packed_kernel_ok = self.in_features % 8 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        if x2.shape[0] <= _INT8_PACKED_KERNEL_MAX_ROWS and self._packed_kernel_ok:
            y = torch._weight_int8pack_mm(aligned(x2), self.weight, self._scale_bf16)  # (M, N)
        else:
            y = F.linear(x2, self.weight.to(torch.bfloat16) * self._scale_bf16[:, None])  # (M, N)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]  # (N, K)


class Int4WeightOnlyLinear(nn.Module):
    """Scheme "int4-weight": 4-bit weights in groups along the input, bfloat16 compute.

    Runs torch's CPU int4 kernel, which wants the output width a multiple of 16 and the input a whole
    number of groups: both are padded with zeros in the packed copy, and the input and output sliced.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_zero: torch.Tensor,
        in_features: int,
        group_size: int,
    ):
        super().__init__()
        self.out_features, self.in_features, self.group_size = weight.shape[0], in_features, group_size
        self.register_buffer("weight", weight)  # uint8 (N, Kp/2)
        self.register_buffer("weight_scale", weight_scale)  # bfloat16 (N, Kp/gs)
        self.register_buffer("weight_zero", weight_zero)  # bfloat16 (N, Kp/gs)
        self._k_pad = weight.shape[1] * 2 - in_features
        n_pad = -self.out_features % 16
        q = F.pad(unpack_int4(weight).to(torch.int32), (0, 0, 0, n_pad))  # (Np, Kp)
        self._packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        scales_and_zeros = torch.stack((weight_scale, weight_zero), dim=-1)  # (N, G, 2)
        scales_and_zeros = F.pad(scales_and_zeros, (0, 0, 0, 0, 0, n_pad))  # (Np, G, 2)
        self._scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous()  # (G, Np, 2), the kernel's layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (M, K)
        if self._k_pad:
            x2 = F.pad(x2, (0, self._k_pad))  # (M, Kp)
        y = torch._weight_int4pack_mm_for_cpu(x2, self._packed, self.group_size, self._scales_and_zeros)  # (M, Np)
        return y[:, : self.out_features].to(x.dtype).reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        q = unpack_int4(self.weight).float()  # (N, Kp)
        groups = q.view(self.out_features, -1, self.group_size) - 8  # (N, G, gs)
        w = groups * self.weight_scale.float()[..., None] + self.weight_zero.float()[..., None]
        return w.view(self.out_features, -1)[:, : self.in_features]  # (N, K)


QUANTIZED_MODULES = (Int8Embedding, DynamicInt8Linear, Int8WeightOnlyLinear, Int4WeightOnlyLinear)


def per_row_qint8(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) with float32 scales (N,) as the per-channel qint8 tensor fbgemm's prepack ops take."""
    with warnings.catch_warnings():
        # torch deprecates creating qint8 tensors, yet its packed dynamic linear (still the fastest
        # int8 GEMM on CPU in 2.13) takes nothing else; this runs once per layer at load.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return torch._make_per_channel_quantized_tensor(
            weight, weight_scale.double(), torch.zeros_like(weight_scale, dtype=torch.long), 0
        )


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied if its data does not start on a 64-byte boundary.

    torch's int8 weight-only kernel crashes the process (no exception) on misaligned operands, and
    tensors read from a safetensors file sit at arbitrary offsets; the allocator aligns to 64.
    """
    return t if t.data_ptr() % 64 == 0 else t.clone()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """4-bit values (N, K) (K even, each 0..15) -> uint8 (N, K/2), the even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> 4-bit values (N, K) as uint8, the inverse of `pack_int4`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


@functools.cache
def activations_need_reduced_range() -> bool:
    """Whether fbgemm needs 7-bit activations here: True unless the CPU has AVX512-VNNI.

    Without VNNI, fbgemm sums pairs of u8 x s8 products in int16, which can saturate on full-range
    activations; VNNI accumulates in int32, so the 8th bit is free accuracy (halves the logits error).
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return torch.backends.quantized.engine not in ("x86", "fbgemm") or "avx512_vnni" not in cpuinfo


@functools.cache
def int4_kernel_problem() -> str | None:
    """Why torch's CPU int4 kernel cannot run in this torch (None when it can), found by trying it."""
    try:
        q = torch.randint(0, 16, (16, 32), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        torch._weight_int4pack_mm_for_cpu(torch.ones(1, 32, dtype=torch.bfloat16), packed, 32,
                                          torch.ones(1, 16, 2, dtype=torch.bfloat16))
    except (AttributeError, RuntimeError, NotImplementedError) as e:
        return f"torch {torch.__version__} has no working CPU int4 matmul ({str(e).splitlines()[0]})"
    return None


def int8_linear_type(scheme: str) -> type[nn.Module]:
    """The int8 Linear module of `scheme`: its layers' for the int8 schemes, the output head's for all."""
    return DynamicInt8Linear if scheme == "int8" else Int8WeightOnlyLinear


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Dotted names of the Linear layers inside the decoder layers (q, k, v, o, gate, up, down)."""
    return [f"model.layers.{name}" for name, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)]


def build_quantized_gpt(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild a quantized `gpt` model from its config.json dict and model.safetensors tensors.

    The float skeleton is built on the meta device (no memory, no init), its layers swapped for
    quantized modules made from `tensors`, and the remaining float tensors (norms) assigned.
    Raises ValueError naming the first tensor that is missing, extra, or of the wrong dtype or shape.
    """
    from llmctl.models.gpt import GPT, GPTConfig

    quantization = config.get("quantization")
    scheme = quantization.get("scheme") if isinstance(quantization, dict) else None
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; this llmctl reads {', '.join(SCHEMES)}")
    group_size = quantization.get("group_size")
    if scheme == "int4-weight" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4-weight group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if scheme == "int4-weight" and int4_kernel_problem():
        raise ValueError(f"cannot run an int4-weight model: {int4_kernel_problem()}")
    cfg = GPTConfig.from_dict(config)
    with torch.device("meta"):
        model = GPT(cfg)
    tensors = {name: aligned(t) for name, t in tensors.items()}
    for name in decoder_linear_names(model):
        linear = model.get_submodule(name)
        if scheme == "int4-weight":
            module = _int4_linear_from(tensors, name, linear.out_features, linear.in_features, group_size)
        else:
            weight, scale = _int8_rows_from(tensors, name, linear.out_features, linear.in_features)
            module = int8_linear_type(scheme)(weight, scale)
        model.set_submodule(name, module)
    embed = Int8Embedding(*_int8_rows_from(tensors, "model.embed_tokens", cfg.vocab_size, cfg.d_model))
    model.model.embed_tokens = embed
    if cfg.tie_embeddings:
        model.lm_head = int8_linear_type(scheme)(embed.weight, embed.weight_scale)
    else:
        model.lm_head = int8_linear_type(scheme)(*_int8_rows_from(tensors, "lm_head", cfg.vocab_size, cfg.d_model))
    floats = dict(model.named_parameters())  # what is left: the norms
    unexpected = sorted(set(tensors) - set(floats))
    if unexpected:
        raise ValueError(f"unexpected tensors {unexpected[:3]}")
    for name, t in tensors.items():
        tensors[name] = check_tensor(name, t.float() if t.is_floating_point() else t, floats[name].shape, torch.float32)
    model.load_state_dict(tensors, strict=False, assign=True)
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"missing tensors {missing[:3]}")
    model.quantization = dict(quantization)
    # "int8" quantizes activations with one scale per call: a row's result depends on its batch.
    model.batch_invariant = scheme != "int8"
    return model.eval()


def check_tensor(name: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`t`, refused (ValueError naming it) when missing or not of `dtype` and `shape`."""
    if t is None:
        raise ValueError(f"missing tensor {name!r}")
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"tensor {name!r} is {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}, "
            f"expected {str(dtype).removeprefix('torch.')} {tuple(shape)}"
        )
    return t


def _int8_rows_from(tensors: dict, prefix: str, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    weight = check_tensor(f"{prefix}.weight", tensors.pop(f"{prefix}.weight", None), (rows, cols), torch.int8)
    scale = check_tensor(f"{prefix}.weight_scale", tensors.pop(f"{prefix}.weight_scale", None), (rows,), torch.float32)
    return weight, scale


def _int4_linear_from(tensors: dict, prefix: str, rows: int, cols: int, group_size: int) -> Int4WeightOnlyLinear:
    groups = math.ceil(cols / group_size)
    def take(suffix: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        return check_tensor(f"{prefix}.{suffix}", tensors.pop(f"{prefix}.{suffix}", None), shape, dtype)

    weight = take("weight", (rows, groups * group_size // 2), torch.uint8)
    scale = take("weight_scale", (rows, groups), torch.bfloat16)
    zero = take("weight_zero", (rows, groups), torch.bfloat16)
    return Int4WeightOnlyLinear(weight, scale, zero, cols, group_size)
