"""The model's arithmetic (WHISPER_FLASK_QUANTIZE): fp32, bf16 matmuls, or int8 Linear layers.

Int8 weights for Whisper's Linear layers and logits projection (WHISPER_FLASK_QUANTIZE=int8):

Weights are quantized once, per output channel; activations are quantized per row at each
call and multiplied in exact int32 arithmetic (torch._int_mm). Per-row scales keep a window's
result independent of the other windows in its batch, which torch's dynamic quantization
(one scale per tensor, shared by the whole batch) would not.
"""

from __future__ import annotations

import logging

import torch
import whisper
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: Models whose word error rate with int8 was measured within 0.5 points of fp32 (bench/throughput.py).
INT8_MODELS = frozenset({"base"})


def choose_precision(setting: str, device: str) -> str:
    """The arithmetic a setting means on a device: "none" (fp32; fp16 on CUDA is Whisper's own), "bf16", "int8",
    or "auto" (on the CPU: precision.py measures it)."""
    if device != "cpu":
        if setting in ("int8", "bf16"):
            log.warning("WHISPER_FLASK_QUANTIZE=%s applies to the CPU only; %s runs as Whisper does", setting, device)
        return "none"
    return setting


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


def quantize_int8(model: whisper.Whisper) -> Int8Linear:
    """Swap the model's Linear layers for Int8Linear in place; return the int8 logits projection."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child.weight, child.bias))
    return Int8Linear(model.decoder.token_embedding.weight, None)
