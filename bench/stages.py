"""Where an encoder window and a batched decoder step spend their time, beside what this CPU can do at most: the
profile issue 24 asks for where a target is out of reach ("which stage's time stands in the way").

    .venv/bin/python bench/stages.py [--model base] [--quantize auto] [--runs 5] [--work DIR]

One process, at torch's default thread count (the model thread's), the model in QUANTIZE=--quantize as the service
resolves it (precision.py, measured into --work/models when auto):

1. the CPU's ceilings: a fp32 matmul (2048 x 2048 x 2048, torch.mm) in GFLOP/s, and reading memory (the sum of a
   512 MiB tensor) in GB/s;
2. one encoder window (tests/fixtures/lj001-0001.flac padded to 30 s) in parts, timed by forward hooks on its
   modules in one more run: the Linear layers (whatever their arithmetic, its quantizing included), attention (the
   attention modules less their Linear layers), the convolutions, and the rest; attention's GFLOP/s (QK^T and PV,
   4 x frames^2 x width a layer);
3. a decoder step of 8 windows, one new token each, as the model thread runs it: the mean of such steps while 8
   greedy decodes of that window run at once through ModelThread; and of it, cross-attention over the 8 windows'
   audio caches alone (the model thread's own attention function), in GB/s: it reads every window's keys and
   values, 2 x frames x width fp32 numbers a layer, at every step.

Each other time is the best of --runs after one untimed run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import whisper
from torch import nn
from whisper.model import MultiHeadAttention

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whisper_flask.engine.batching import MODEL_THREADS, ModelThread, use_torch_threads  # noqa: E402
from whisper_flask.engine.checkpoints import ensure_checkpoint  # noqa: E402
from whisper_flask.engine.decoding import _attention, _heads, _keys  # noqa: E402
from whisper_flask.engine.precision import _best_of, _cpu_model, measured_arithmetic  # noqa: E402
from whisper_flask.engine.quantize import StageArithmetic, apply_arithmetic  # noqa: E402

WINDOWS = 8


def ceilings(runs: int) -> tuple[float, float]:
    """This CPU's fp32 matmul GFLOP/s and memory read GB/s."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gflops = 2 * 2048**3 / _best_of(runs, lambda: torch.mm(a, b)) / 1e9
    big = torch.ones(128 * 2**20)  # 512 MiB of float32
    return gflops, big.numel() * 4 / _best_of(runs, big.sum) / 1e9


def encoder_parts(encoder: nn.Module, mel: torch.Tensor) -> dict[str, float]:
    """One encoder window's seconds in its Linear layers, attention, convolutions and the rest."""
    spent: dict[str, float] = defaultdict(float)
    began: dict[nn.Module, float] = {}

    def kind(module: nn.Module) -> str | None:
        if isinstance(module, MultiHeadAttention):
            return "attention"
        if isinstance(module, nn.Conv1d):
            return "convolution"
        return "Linear layers" if type(module).__name__.endswith("Linear") else None  # quantize.py's, or nn.Linear

    def start(module: nn.Module, _: object) -> None:
        began[module] = time.perf_counter()

    attentions = [module for module in encoder.modules() if isinstance(module, MultiHeadAttention)]
    inside = {layer for attention in attentions for layer in attention.modules() if layer is not attention}

    def stop(module: nn.Module, _: object, __: object) -> None:
        seconds = time.perf_counter() - began[module]
        spent[str(kind(module))] += seconds
        if module in inside:  # the attention module's own Linear layers: timed in both
            spent["attention"] -= seconds

    hooks = [
        hook
        for module in encoder.modules()
        if kind(module)
        for hook in (module.register_forward_pre_hook(start), module.register_forward_hook(stop))
    ]
    try:
        window = time.perf_counter()
        encoder(mel)
        window = time.perf_counter() - window
    finally:
        for hook in hooks:
            hook.remove()
    spent["the rest"] = window - sum(spent.values())
    return spent


def decoder_step(thread: ModelThread, features: torch.Tensor) -> float:
    """The mean seconds of a decoder step of WINDOWS windows and one new token each, while WINDOWS windows decode
    `features` at once."""
    options = whisper.DecodingOptions(language="en", temperature=0.0, fp16=False, without_timestamps=False)
    full: list[float] = []
    step = thread._step

    def timed_step(batch: list[Any]) -> Any:
        began = time.perf_counter()
        try:
            return step(batch)
        finally:
            if len(batch) == WINDOWS and all(work.tokens is not None and work.tokens.numel() == 1 for work in batch):
                full.append(time.perf_counter() - began)

    def decode() -> None:
        use_torch_threads(1)  # as the service's job threads
        thread.decode(features, options, seed=0)

    thread._step = timed_step  # type: ignore[method-assign]
    decoders = [threading.Thread(target=decode) for _ in range(WINDOWS)]
    for decoder in decoders:
        decoder.start()
    for decoder in decoders:
        decoder.join(timeout=300)
    assert not any(decoder.is_alive() for decoder in decoders), "a decode took over 300 s"
    assert full, f"no step carried {WINDOWS} windows"
    return sum(full) / len(full)


def cross_attention(model: whisper.Whisper, features: torch.Tensor, runs: int) -> tuple[float, int]:
    """Seconds of one step's cross-attention over WINDOWS windows' audio caches (a new token each), and the bytes
    of those caches."""
    caches = []
    for _ in range(WINDOWS):  # each window its own copy, as WindowInference keeps it
        for block in model.decoder.blocks:
            cross = block.cross_attn
            caches.append((_keys(cross.key(features), cross.n_head), _heads(cross.value(features), cross.n_head)))
    query = torch.randn(1, 1, model.dims.n_text_state)
    heads = model.decoder.blocks[0].cross_attn.n_head
    seconds = _best_of(runs, lambda: [_attention(query, key, value, heads) for key, value in caches])
    return seconds, sum(tensor.numel() * tensor.element_size() for cache in caches for tensor in cache)


def main() -> None:
    """Print the ceilings, the encoder window in parts and the decoder step with its cross-attention."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--quantize", default="auto", help="auto, or encoder,decoder arithmetics (quantize.py)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="whisper-stages-"))
    use_torch_threads(MODEL_THREADS)
    checkpoint = ensure_checkpoint(args.model, work / "models", allow_download=False)
    model = whisper.load_model(str(checkpoint), device="cpu")
    if args.quantize == "auto":
        stages = measured_arithmetic(model, args.model, work / "models")
    else:
        encoder, decoder = args.quantize.split(",")
        stages = StageArithmetic(encoder, decoder, "none")
    applied = apply_arithmetic(model, stages)
    audio = whisper.load_audio(str(ROOT / "tests" / "fixtures" / "lj001-0001.flac"))
    mel = whisper.pad_or_trim(whisper.log_mel_spectrogram(audio, model.dims.n_mels), whisper.audio.N_FRAMES)[None]
    print(f"model {args.model}, CPU {_cpu_model()}, {MODEL_THREADS} threads;"  # noqa: T201
          f" encoder {stages.encoder}, decoder {stages.decoder}")  # fmt: skip
    with torch.no_grad():
        gflops, bandwidth = ceilings(args.runs)
        print(f"ceilings: fp32 matmul {gflops:.0f} GFLOP/s, memory read {bandwidth:.1f} GB/s")  # noqa: T201
        window = _best_of(args.runs, lambda: model.encoder(mel))
        kinds = encoder_parts(model.encoder, mel)
        frames, width = model.dims.n_audio_ctx, model.dims.n_audio_state
        attention_gflop = 4 * frames**2 * width * model.dims.n_audio_layer / 1e9
        print(f"encoder window: {window:.3f} s; in parts (one more run, hooked):")  # noqa: T201
        for kind, seconds in sorted(kinds.items(), key=lambda item: -item[1]):
            rate = f", {attention_gflop / seconds:.0f} GFLOP/s" if kind == "attention" else ""
            print(f"  {kind:14} {seconds:.3f} s ({100 * seconds / sum(kinds.values()):.0f} %){rate}")  # noqa: T201
        features = model.encoder(mel)
        attention, size = cross_attention(model, features, args.runs)
    thread = ModelThread(WINDOWS, wait_s=0.05)
    thread.start(model, applied.projection)
    try:
        step = decoder_step(thread, features)
    finally:
        thread.stop()
    read = f"{1000 * attention:.1f} ms, reading {size / 2**20:.0f} MiB ({size / attention / 1e9:.1f} GB/s)"
    print(f"decoder step of {WINDOWS} windows: {1000 * step:.1f} ms; of it cross-attention {read}")  # noqa: T201


if __name__ == "__main__":
    main()
