"""The model's arithmetic (WHISPER_FLASK_QUANTIZE), chosen per stage: fp32, fp16-weight, bf16 or int8 Linear layers.

A Whisper model's work is its encoder (a window's 1500 rows at once) and its decoder steps (a few rows
each): a CPU's matrix units can pay off on one and not on the other (ARCHITECTURE.md, "The engine"),
so each stage's Linear layers get their own arithmetic:

- "none": Whisper's fp32;
- "fp16" (on CPUs where fbgemm runs: fbgemm): weights stored in fp16 and multiplied in fp32 by fbgemm, which
  reads half the bytes. Whisper's checkpoints are stored in fp16, so the weights are exactly the loaded fp32 ones
  and the results differ from fp32 by summation order only (5e-7 relative). A decoder step is memory-bound: the
  logits projection at one row took 1.8 ms against 7.8 ms in fp32 (AMD EPYC with AVX2 only, 2 threads);
- "bf16" (the encoder only, on CPUs where oneDNN has bf16 kernels: onednn_bf16): weights stored in bf16 once and
  multiplied by oneDNN's prepacked bf16 kernels (AMX or AVX512-BF16 where the CPU has them); inputs cast to bf16,
  outputs back to fp32. Not autocast, which casts the weights again at every call (the logits projection's 106 MB
  at every decoder step: 21.3 ms a step against 2.2 ms in fp32 on an Intel Xeon with AMX);
- "int8": weights quantized once, per output channel; activations per row at each call, multiplied in
  exact int32 arithmetic (torch._int_mm). Per-row scales keep a window's result independent of the other
  windows in its batch, which torch's dynamic quantization (one scale per tensor) would not;
- "int8-fbgemm" (the file encoder only, for auto to measure, where fbgemm runs): fbgemm's dynamic int8 linear, one
  activation scale per call, which the encoder's one window a call makes that window's own. Where the CPU lacks
  VNNI, torch._int_mm has no fast kernel (an encoder window 9.39 s against 0.62 s in fp32) and fbgemm's AVX2 kernels
  do (0.48 s; auto's timings on an AMD EPYC with AVX2 only, 2 threads). Not for live sessions: their few seconds,
  decoded again and again, lost words to its error (ARCHITECTURE.md, "The engine"), so they keep an encoder of their
  own.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import whisper
from torch import Tensor, nn
from whisper.model import AudioEncoder, TextDecoder

from whisper_flask.engine.batching import Projection, whisper_projection

log = logging.getLogger(__name__)

#: The decoder's candidates: in bf16 a window's timestamps and scores changed with the windows beside it in a
#: step (tests/test_end_to_end.py); int8 and fp16 rows never do. The encoder runs one window at a time: bf16 is safe
#: there.
DECODER_ARITHMETICS = ("none", "fp16", "int8")
#: fp16 weights gain nothing on the encoder's 1500-row matmuls, which are compute-bound: 17.4 to 18.7 ms against
#: 17.4 to 17.8 ms in fp32 for a 512 x 2048 layer (AMD EPYC with AVX2 only, 2 threads).
ENCODER_ARITHMETICS = ("none", "bf16", "int8", "int8-fbgemm")
#: What a live session's encoder may run in: one activation scale for a buffer that grows at every step makes the
#: successive decodes that agreement compares disagree. The 70 s chapter fed in-process (bench/live_accuracy.py
#: --encoder, AVX2-only AMD EPYC): word error rate 4.24 % with int8-fbgemm; 1.82 % in fp32, in per-row int8, and in
#: bf16 (emulated there by that script).
LIVE_ENCODER_ARITHMETICS = ("none", "bf16", "int8")
#: Models whose word error rate with int8 (either kind) and with bf16 was measured within 0.5 points of bare fp32
#: Whisper's on the shared long recordings (bench/long_file.py).
INT8_MODELS = frozenset({"base"})
BF16_MODELS = frozenset({"base"})


@dataclass(frozen=True)
class StageArithmetic:
    """The arithmetic of the encoder's and of the decoder's Linear layers (the logits projection is the decoder's), and
    of live sessions' encoder (the file jobs' one where it is one of LIVE_ENCODER_ARITHMETICS)."""

    encoder: str
    decoder: str
    live_encoder: str

    @classmethod
    def chosen(cls, setting: str) -> StageArithmetic:
        """What an explicit QUANTIZE (none, fp16, bf16 or int8) means per stage: bf16 for the encoder only, fp16 for
        the decoder only."""
        encoder = setting if setting in ENCODER_ARITHMETICS else "none"
        live = encoder if encoder in LIVE_ENCODER_ARITHMETICS else "none"
        return cls(encoder, setting if setting in DECODER_ARITHMETICS else "none", live)

    def as_dict(self) -> dict[str, str]:
        """Each stage's arithmetic, by stage."""
        return {"encoder": self.encoder, "decoder": self.decoder, "live_encoder": self.live_encoder}


def choose_precision(setting: str, device: str) -> str:
    """The arithmetic a setting means on a device: "none" (fp32; fp16 on CUDA is Whisper's own), "fp16", "bf16", "int8",
    or "auto" (on the CPU: precision.py measures it)."""
    if device != "cpu":
        if setting not in ("auto", "none"):
            log.warning("WHISPER_FLASK_QUANTIZE=%s applies to the CPU only; %s runs as Whisper does", setting, device)
        return "none"
    if setting == "fp16" and not fbgemm():
        log.warning("WHISPER_FLASK_QUANTIZE=fp16: torch has no fbgemm fp16 kernels on this CPU; the model runs in fp32")
        return "none"
    if setting == "bf16" and not onednn_bf16():
        log.warning("WHISPER_FLASK_QUANTIZE=bf16: this CPU has no bf16 matrix kernels (oneDNN needs AVX512-BW/VL/DQ"
                    " or AVX-NE-CONVERT); the encoder runs in fp32")  # fmt: skip
        return "none"
    return setting


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN's prepacked bf16 matmul runs on this CPU (torch refuses it where the CPU lacks the units).

    Without it bf16 is emulated: the encoder's 1500 x 512 by 512 x 2048 matmul took 171 ms against 22 ms in
    fp32 (AMD EPYC with AVX2 only, 2 threads), so bf16 is then neither measured nor used.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), None)
    except RuntimeError:
        return False
    return True


@functools.cache
def fbgemm() -> bool:
    """Whether fbgemm's fp16-weight and int8 linears run here (an x86 build of torch on a CPU with AVX2)."""
    try:
        Fp16Linear(torch.zeros(16, 16), None)
        FbgemmInt8Linear(torch.zeros(16, 16), None)
    except RuntimeError:
        return False
    return True


class Fp16Linear(nn.Module):
    """y = x W^T + b with W stored in fp16 and prepacked for fbgemm, multiplied in fp32 (fbgemm() CPUs)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.packed = torch.ops.quantized.linear_prepack_fp16(
            weight.detach().float(), None if bias is None else bias.detach().float()
        )

    def forward(self, x: Tensor) -> Tensor:
        """Multiply by the fp16 weights; the rest of the model goes on in fp32."""
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


class FbgemmInt8Linear(nn.Module):
    """y = x W^T + b by fbgemm's dynamic int8 linear: W per output channel, x with one scale for the whole call.

    One scale per call makes a row depend on the rows beside it, so only for the file jobs' encoder, which runs one
    window a call. Activations are kept to 7 bits (reduce_range) on every CPU: fbgemm's AVX2 kernels sum pairs in 16
    bits, which 8 bits could saturate, and it is on CPUs without VNNI that this arithmetic wins.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors; fbgemm's prepack takes only them
            warnings.simplefilter("ignore", UserWarning)
            quantized = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0,
                                                   torch.qint8)  # fmt: skip
        self.packed = torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        """Quantize x with one scale, multiply in int32, scale back to float."""
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (per output channel) and x quantized per row."""

    weight_t: Tensor
    weight_scale: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_t", torch.round(weight / scale[:, None]).to(torch.int8).t())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: Tensor) -> Tensor:
        """Quantize each row of x, multiply in int32, scale back to float."""
        rows = x.reshape(-1, x.shape[-1])
        # In-place steps: on the encoder's (1500 x 2048) activations each extra pass costs
        # about as much as the int8 matmul itself.
        # amax and amin, not aminmax: the same values, measured 10x faster on CPU in torch 2.13.
        scale = torch.maximum(rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True).neg_())
        scale = scale.clamp_(min=1e-12).div_(127)
        quantized = torch.div(rows, scale).round_().to(torch.int8)
        y = torch._int_mm(quantized, self.weight_t).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*x.shape[:-1], -1)


class Bf16Linear(nn.Module):
    """y = x W^T + b with W stored in bf16 and prepacked for oneDNN, x cast to bf16, y in fp32 (onednn_bf16() CPUs)."""

    weight: Tensor
    bias: Tensor | None

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        # Reordered once into oneDNN's blocked layout, instead of at every call.
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), None)
        self.register_buffer("weight", packed)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: Tensor) -> Tensor:
        """Multiply in bf16; the rest of the model goes on in fp32."""
        y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, self.bias, "none", [], "")
        return y.float()


#: Each arithmetic's Linear layer, made from a weight and a bias.
_LINEARS: dict[str, Callable[[Tensor, Tensor | None], nn.Module]] = {
    "bf16": Bf16Linear, "fp16": Fp16Linear, "int8": Int8Linear, "int8-fbgemm": FbgemmInt8Linear,
}  # fmt: skip


def swap_linears(module: nn.Module, arithmetic: str) -> None:
    """Swap the module's Linear layers (Whisper's own subclass included) for the arithmetic's, in place."""
    if arithmetic == "none":
        return
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, _LINEARS[arithmetic](child.weight, child.bias))


@dataclass(frozen=True)
class AppliedArithmetic:
    """What apply_arithmetic made besides the model's own stages: the logits projection and live sessions' encoder."""

    projection: Projection
    live_encoder: AudioEncoder


def apply_arithmetic(model: whisper.Whisper, stages: StageArithmetic) -> AppliedArithmetic:
    """Give each stage of the model its arithmetic, in place; a copy of the fp32 encoder in live sessions' arithmetic
    where theirs differs (base's: 20 M parameters), the model's own encoder where not."""
    live_encoder = model.encoder
    if stages.live_encoder != stages.encoder:
        live_encoder = copy.deepcopy(model.encoder)
        swap_linears(live_encoder, stages.live_encoder)
    swap_linears(model.encoder, stages.encoder)
    swap_linears(model.decoder, stages.decoder)
    return AppliedArithmetic(projection(model.decoder, stages.decoder), live_encoder)


def projection(decoder: TextDecoder, arithmetic: str) -> Projection:
    """The decoder's logits projection in `arithmetic`."""
    if arithmetic == "none":
        return whisper_projection(decoder)
    return _LINEARS[arithmetic](decoder.token_embedding.weight, None)
