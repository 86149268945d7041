"""The CPU arithmetic paths for Whisper's matmuls, side by side in one run (issue 24, item 2).

    .venv/bin/python bench/arithmetic.py [--model base] [--runs 5] [--work DIR] [--paths fp32 int8 ...]
                                         [--json PATH]

It times, at torch's default thread count, the work the model thread does (whisper_flask/engine/precision.py):
one encoder window (mel (1, 80, 3000) of tests/fixtures/lj001-0001.flac, padded to 30 s), and the Linear
work of a decoder step (attention over the caches aside) with the logits projection at 1, 3 and 8 rows of new
tokens (the token and position embeddings of that recording's text). Each figure is the best of --runs after
one untimed run; "window" is one encoder pass and STEPS_PER_WINDOW steps (their mean over the row counts),
precision.py's estimate. Paths:

- fp32: nn.Linear as loaded; bf16-autocast: today's bf16, torch.autocast entered once around all runs;
- bf16-weights: a copy converted with .to(torch.bfloat16) (the projection's weight transposed once), input
  cast to bf16, output back to float32; bf16-onednn: the same with each Linear and the projection run by
  oneDNN's prepacked bf16 linear (torch.ops.mkldnn._linear_pointwise, weights reordered once); int8-weights:
  the same with int8 weights per output channel and bf16 activations, not quantized (torch._weight_int8pack_mm:
  a decoder step moves a quarter of fp32's bytes, and no row's scale depends on another);
- int8: the service's Int8Linear (quantize.py: per-channel weights, per-row activations, torch._int_mm);
  bf16-linear: the service's Bf16Linear (quantize.py: oneDNN's prepacked bf16 linear, fp32 between layers);
  fp16-linear: the service's Fp16Linear (quantize.py: fbgemm's fp16-weight linear; Whisper's checkpoints are fp16),
  in both stages here, though the service keeps it to the decoder;
- dynamic-<engine>: torch.ao quantize_dynamic (qint8, per-channel weights, per-tensor activations), the
  projection as an nn.Linear too, under each quantized engine torch supports among x86, fbgemm, onednn;
- compile-fp32, compile-int8: torch.compile(dynamic=False) of the decoder step, once per row count; the
  compile time (less if torch's inductor cache holds an earlier run's) is reported apart; the encoder runs
  uncompiled.

Errors are against fp32, of the encoder output and of the logits at 8 rows: "max" is the largest absolute
difference over the largest absolute fp32 value (for the encoder, a few positions in the padding's silence
decide it), "rms" the root mean square of the differences over fp32's; "top1" counts the 8 rows whose arg-max
token is fp32's. "batch" is the max error of row 0's logits alone against row 0 among 8 rows: a path whose
result depends on its batch partners (per-tensor activation scales) shows it there, and the service needs
each window's result alone. A path that fails prints its error in place of its figures. The load average
at the start is printed: other work on the CPU slows torch's threads, which wait for each other.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import whisper
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whisper_flask.engine.batching import whisper_projection  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.engine.precision import ROWS, STEPS_PER_WINDOW, _best_of, _cpu_model  # noqa: E402
from whisper_flask.engine.quantize import StageArithmetic, apply_arithmetic  # noqa: E402

AUDIO = ROOT / "tests" / "fixtures" / "lj001-0001.flac"
TEXT = " Printing, in the only sense with which we are at present concerned, differs from most if not all the arts"
ENGINES = ("x86", "fbgemm", "onednn")
PATHS = (
    "fp32",
    "bf16-autocast",
    "bf16-weights",
    "bf16-onednn",
    "int8-weights",
    "int8",
    "bf16-linear",
    "fp16-linear",
    *(f"dynamic-{e}" for e in ENGINES),
    "compile-fp32",
    "compile-int8",
)
#: The service's own Linear layers other than int8, by path.
SERVICE_LINEAR = {"bf16-linear": "bf16", "fp16-linear": "fp16"}
UNITS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni")
Fn = Callable[[Tensor], Tensor]


@dataclass
class Arithmetic:
    """How one path runs the encoder and a decoder step, and the context its runs need."""

    encoder: Fn
    step: Fn
    context: Callable[[], AbstractContextManager[Any]] = nullcontext
    compiled: bool = False


@dataclass
class Result:
    """One path's figures (seconds; errors relative to fp32), or the error that stopped it."""

    path: str
    encoder_s: float | None = None
    step_s: dict[int, float] = field(default_factory=dict)
    window_s: float | None = None
    encoder_err: tuple[float, float] | None = None  # (max, rms)
    logits_err: tuple[float, float] | None = None
    top1: int | None = None
    batch_err: float | None = None
    compile_s: float | None = None
    failed: str | None = None


def decoder_step(model: whisper.Whisper, project: Fn, dtype: torch.dtype = torch.float32) -> Fn:
    """A decoder step's Linear work on x (rows, n_text_state) in dtype, then the float32 logits (as precision.py)."""

    def step(x: Tensor) -> Tensor:
        x = x.to(dtype)
        for block in model.decoder.blocks:
            h = block.attn_ln(x)
            x = x + block.attn.out(block.attn.query(h) + block.attn.key(h) + block.attn.value(h))
            x = x + block.cross_attn.out(block.cross_attn.query(block.cross_attn_ln(x)))
            x = x + block.mlp(block.mlp_ln(x))
        return project(model.decoder.ln(x)).float()

    return step


def encoder_in(model: whisper.Whisper, dtype: torch.dtype = torch.float32) -> Fn:
    """The encoder on a float32 mel, run in dtype, its output in float32."""
    return lambda mel: model.encoder(mel.to(dtype)).float()


def swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace every nn.Linear in the model with make(it), in place."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, make(child))


class OnednnLinear(nn.Module):
    """A bf16 Linear through oneDNN's prepacked linear: the weight reordered once, bf16 in and out."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), None)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        """y = x W^T + b in oneDNN's bf16 kernels."""
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, self.bias, "none", [], "")


class Int8WeightLinear(nn.Module):
    """y = x W^T + b with W in int8 per output channel, x in bf16 and not quantized (torch._weight_int8pack_mm)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight, self.scale = torch.round(weight / scale[:, None]).to(torch.int8), scale.to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        """Multiply x's rows by the int8 weight, each output channel scaled back, in bf16."""
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.weight, self.scale)
        return (y if self.bias is None else y + self.bias).reshape(*x.shape[:-1], -1)


BF16_LINEAR = {"bf16-weights": None, "bf16-onednn": OnednnLinear, "int8-weights": Int8WeightLinear}


def plain_linear(layer: nn.Linear) -> nn.Linear:
    """An nn.Linear of the layer's weights (quantize_dynamic swaps that exact type only, not Whisper's subclass)."""
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.load_state_dict(layer.state_dict())
    return plain


@contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """torch.backends.quantized.engine set to engine, restored after."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def dynamic(model: whisper.Whisper, engine: str) -> Arithmetic:
    """Linear layers and the projection by quantize_dynamic, prepacked for engine."""
    model = copy.deepcopy(model)
    swap_linears(model, plain_linear)
    projection = nn.Linear(model.dims.n_text_state, model.dims.n_vocab, bias=False)
    projection.weight = nn.Parameter(model.decoder.token_embedding.weight.detach().clone())
    spec = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
    with quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic's notice that it moves to torchao
        torch.ao.quantization.quantize_dynamic(model, spec, inplace=True)
        quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(projection), spec)
    return Arithmetic(encoder_in(model), decoder_step(model, quantized), lambda: quantized_engine(engine))


def bf16_copy(model: whisper.Whisper, linear: Callable[[Tensor, Tensor | None], nn.Module] | None) -> Arithmetic:
    """A bf16 copy of the model, its Linear layers and projection made by linear(weight, bias) if given."""
    model = copy.deepcopy(model)
    embedding = model.decoder.token_embedding.weight.detach()
    weight_t = embedding.to(torch.bfloat16).t().contiguous()
    project: Fn = lambda x: x @ weight_t  # noqa: E731
    if linear is not None:  # from the float32 weights
        swap_linears(model, lambda layer: linear(layer.weight, layer.bias))
        project = linear(embedding, None)
    model.to(torch.bfloat16)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):  # Whisper's LayerNorm runs in float32 and casts back
            module.float()
    return Arithmetic(encoder_in(model, torch.bfloat16), decoder_step(model, project, torch.bfloat16))


def compiled(arithmetic: Arithmetic) -> Arithmetic:
    """The arithmetic with its decoder step compiled by torch.compile for static shapes (the encoder as it was)."""
    return Arithmetic(arithmetic.encoder, torch.compile(arithmetic.step, dynamic=False), arithmetic.context, True)


def build(path: str, model: whisper.Whisper) -> Arithmetic:
    """The path's Arithmetic, on the loaded model or a copy of it."""
    fp32 = Arithmetic(encoder_in(model), decoder_step(model, whisper_projection(model.decoder)))
    if path == "fp32":
        return fp32
    if path == "bf16-autocast":
        return Arithmetic(fp32.encoder, fp32.step, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    if path in BF16_LINEAR:
        return bf16_copy(model, BF16_LINEAR[path])
    if path.endswith("int8") or path in SERVICE_LINEAR:
        quantized = copy.deepcopy(model)
        kind = SERVICE_LINEAR.get(path, "int8")
        project = apply_arithmetic(quantized, StageArithmetic(kind, kind, kind)).projection
        service = Arithmetic(encoder_in(quantized), decoder_step(quantized, project))
        return compiled(service) if path == "compile-int8" else service
    if path == "compile-fp32":
        return compiled(fp32)
    if path.startswith("dynamic-"):
        return dynamic(model, path.removeprefix("dynamic-"))
    raise ValueError(f"unknown path {path}")


def relative(value: Tensor, reference: Tensor) -> tuple[float, float]:
    """(largest absolute difference over the reference's largest absolute value, the same in root mean squares)."""
    difference = value.float() - reference
    return float(difference.abs().max() / reference.abs().max()), float(difference.norm() / reference.norm())


def measure(
    path: str, model: whisper.Whisper, mel: Tensor, x: Tensor, reference: tuple[Tensor, Tensor], runs: int
) -> Result:
    """Time and check one path; a failure is kept in the result, not raised."""
    result = Result(path)
    try:
        arithmetic = build(path, model)
        with torch.no_grad(), arithmetic.context():
            if arithmetic.compiled:  # the first call at each shape compiles it
                started = time.perf_counter()
                for rows in ROWS:
                    arithmetic.step(x[:rows])
                result.compile_s = time.perf_counter() - started
            result.encoder_s = _best_of(runs, lambda: arithmetic.encoder(mel))
            result.step_s = {rows: _best_of(runs, partial(arithmetic.step, x[:rows])) for rows in ROWS}
            encoded, logits = arithmetic.encoder(mel), arithmetic.step(x)
            alone = arithmetic.step(x[:1])
        result.window_s = result.encoder_s + STEPS_PER_WINDOW * sum(result.step_s.values()) / len(ROWS)
        result.encoder_err, result.logits_err = relative(encoded, reference[0]), relative(logits, reference[1])
        result.top1 = int((logits.argmax(-1) == reference[1].argmax(-1)).sum())
        result.batch_err = relative(alone[0], logits[0].float())[0]
    except Exception as exc:  # a path that does not work here is a finding, not a crash
        result.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:160]
    return result


def cpu_lines() -> list[str]:
    """The CPU model, its matrix-unit flags and torch's version and threads."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return [
        f"CPU: {_cpu_model()}",
        "matrix-unit flags: " + " ".join(f"{unit}={'yes' if unit in flags else 'no'}" for unit in UNITS),
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, quantized engines "
        f"{torch.backends.quantized.supported_engines}; load average {os.getloadavg()[0]:.2f}",
    ]


def table(results: list[Result]) -> list[str]:
    """The results as text, one row per path."""
    head = f"{'path':15} {'enc s':>6} " + " ".join(f"{f'step{r} ms':>9}" for r in ROWS)
    errors = " ".join(f"{name:>9}" for name in ("enc max", "enc rms", "logit max", "logit rms"))
    lines = [head + f" {'window s':>8} {errors} {'top1':>4} {'batch':>8} {'compile s':>9}"]
    for r in results:
        if r.failed:
            lines.append(f"{r.path:15} FAILED {r.failed}")
            continue
        steps = " ".join(f"{1000 * r.step_s[rows]:9.2f}" for rows in ROWS)
        compiled = f"{r.compile_s:9.1f}" if r.compile_s is not None else f"{'-':>9}"
        errors = " ".join(f"{error:9.1e}" for error in (*(r.encoder_err or ()), *(r.logits_err or ())))
        lines.append(f"{r.path:15} {r.encoder_s:6.3f} {steps} {r.window_s:8.3f} {errors} {r.top1:>2}/8 "
                     f"{r.batch_err:8.1e} {compiled}")  # fmt: skip
    return lines


def inputs(model: whisper.Whisper) -> tuple[Tensor, Tensor]:
    """The encoder's mel of the fixture recording, and 8 decoder rows: its text's token and position embeddings."""
    audio = whisper.pad_or_trim(whisper.load_audio(str(AUDIO)))
    mel = whisper.log_mel_spectrogram(audio, model.dims.n_mels)[None]
    tokenizer = whisper.tokenizer.get_tokenizer(model.is_multilingual, language="en", task="transcribe")
    tokens = torch.tensor([*tokenizer.sot_sequence_including_notimestamps, *tokenizer.encode(TEXT)][:8])
    with torch.no_grad():
        x = model.decoder.token_embedding(tokens) + model.decoder.positional_embedding[: len(tokens)]
    return mel, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--runs", type=int, default=5, help="best of this many timed runs")
    parser.add_argument("--work", type=Path, help="model cache (default: a new temporary directory)")
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    header = cpu_lines()
    print("\n".join(header), flush=True)  # noqa: T201
    work = args.work or Path(tempfile.mkdtemp(prefix="whisper-arithmetic-"))
    model = whisper.load_model(str(ensure_checkpoint(args.model, work / "models", allow_download=False)), "cpu")
    mel, x = inputs(model)
    with torch.no_grad():
        reference = (model.encoder(mel), decoder_step(model, whisper_projection(model.decoder))(x))
    supported = torch.backends.quantized.supported_engines
    results = []
    for path in args.paths:
        if path.startswith("dynamic-") and path.removeprefix("dynamic-") not in supported:
            results.append(Result(path, failed=f"engine not in {supported}"))
            continue
        results.append(measure(path, model, mel, x, reference, args.runs))
        print(f"measured {path}", file=sys.stderr, flush=True)  # noqa: T201
    print(f"model {args.model}; window = encoder + {STEPS_PER_WINDOW} steps (mean over {ROWS} rows)")  # noqa: T201
    print("\n".join(table(results)))  # noqa: T201
    if args.json:
        args.json.write_text(json.dumps({"cpu": header, "results": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    main()
