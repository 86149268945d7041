"""QUANTIZE=auto: the arithmetic of each stage measured fastest for this model on this CPU, not guessed from its flags.

A default tuned on one CPU loses on another, and a stage's winner may lose the other stage: bf16 can win the
encoder's 1500-row matmuls and int8 the decoder's few rows (ARCHITECTURE.md, "The engine"). So at load each stage's
real work is timed under each arithmetic it may use (quantize.py: the decoder never bf16 nor int8-fbgemm, the
encoder never fp16): an encoder window; the Linear work of a decoder step (its layers and the logits projection, as
the model thread runs them) at 1, 3 and 8 rows, STEPS_PER_WINDOW steps a window. Each stage takes its fastest. int8
and bf16 are candidates only for the models whose word error rate with them was measured within 0.5 points of fp32
(quantize.INT8_MODELS, BF16_MODELS), and bf16 only where the CPU has oneDNN's bf16 kernels (quantize.onednn_bf16);
fp16 weights lose nothing (Whisper's checkpoints are fp16) and are a candidate for every model where fbgemm runs
(quantize.fbgemm). Live sessions' encoder takes the fastest of the encoder's timings that live sessions may run
(quantize.LIVE_ENCODER_ARITHMETICS). A stage with one candidate runs it unmeasured. The timings are kept in
MODEL_DIR per CPU model, torch version, thread count, model and stage, so later starts skip the measuring.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import whisper
from torch import Tensor
from whisper.model import TextDecoder

from whisper_flask.engine.batching import MODEL_THREADS, Projection, use_torch_threads
from whisper_flask.engine.quantize import (
    BF16_MODELS,
    DECODER_ARITHMETICS,
    ENCODER_ARITHMETICS,
    INT8_MODELS,
    LIVE_ENCODER_ARITHMETICS,
    StageArithmetic,
    fbgemm,
    onednn_bf16,
    projection,
    swap_linears,
)
from whisper_flask.files import atomic_write

log = logging.getLogger(__name__)

#: Decoder steps a 30 s window of speech takes (its 60 to 120 tokens, one step each, and few fallbacks).
STEPS_PER_WINDOW = 100
#: Rows a decoder step runs on: one window alone, a few jobs, a full batch.
ROWS = (1, 3, 8)
CACHE_NAME = "arithmetic.json"
STAGES = ("encoder", "decoder")


def measured_arithmetic(model: whisper.Whisper, name: str, model_dir: Path) -> StageArithmetic:
    """Each stage's arithmetic measured fastest for the model here (the model is left as it is); kept in model_dir."""

    def measure(stage: str, candidates: list[str]) -> dict[str, float]:
        use_torch_threads(MODEL_THREADS)  # as the model thread will run it
        return {arithmetic: _stage_seconds(model, stage, arithmetic) for arithmetic in candidates}

    timed: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        candidates = _candidates(name, stage)
        # The candidates are part of the name kept: a new arithmetic, or one no longer allowed, measures again.
        kept_as = f"{name} {stage} ({', '.join(candidates)})"
        measured = partial(measure, stage, candidates)
        timed[stage] = {candidates[0]: 0.0} if len(candidates) == 1 else kept_seconds(model_dir, kept_as, measured)
    live = {arithmetic: s for arithmetic, s in timed["encoder"].items() if arithmetic in LIVE_ENCODER_ARITHMETICS}
    return StageArithmetic(fastest(timed["encoder"]), fastest(timed["decoder"]), fastest(live))


def _candidates(name: str, stage: str) -> list[str]:
    """The arithmetics the stage of model `name` may run on this CPU, fp32 first."""
    runs_here = {"none": True, "fp16": fbgemm(), "bf16": name in BF16_MODELS and onednn_bf16(),
                 "int8": name in INT8_MODELS, "int8-fbgemm": name in INT8_MODELS and fbgemm()}  # fmt: skip
    allowed = ENCODER_ARITHMETICS if stage == "encoder" else DECODER_ARITHMETICS
    return [arithmetic for arithmetic, runs in runs_here.items() if runs and arithmetic in allowed]


def kept_choice(model_dir: Path, name: str, measure: Callable[[], dict[str, float]]) -> str:
    """The fastest of what `measure` times for `name` (seconds by arithmetic) on this CPU (kept_seconds)."""
    return fastest(kept_seconds(model_dir, name, measure))


def fastest(seconds: dict[str, float]) -> str:
    """The arithmetic of the fewest seconds."""
    return min(seconds, key=lambda arithmetic: seconds[arithmetic])


def kept_seconds(model_dir: Path, name: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """What `measure` times for `name` (seconds by arithmetic) on this CPU, measured once and kept in model_dir's
    CACHE_NAME per CPU model, torch version and thread count."""
    cpu = _cpu_model()
    key, cache = f"{cpu}|torch {torch.__version__}|{MODEL_THREADS} threads|{name}", model_dir / CACHE_NAME
    known = _read(cache)
    if key in known:
        return {str(arithmetic): float(s) for arithmetic, s in known[key]["seconds"].items()}
    seconds = measure()
    chosen = fastest(seconds)
    log.info("arithmetic for %s measured on %s: %s; fastest: %s", name, cpu,
             ", ".join(f"{a} {s:.3f} s" for a, s in seconds.items()), chosen)  # fmt: skip
    try:
        with atomic_write(cache) as file:
            # "chosen" is for whoever reads the file: the timings decide (the live encoder's choice may differ).
            json.dump({**known, key: {"chosen": chosen, "seconds": seconds}}, file, indent=1)
    except OSError as exc:  # a read-only MODEL_DIR: measured again at the next start
        log.warning("the arithmetic measured could not be kept in %s: %s", cache, exc)
    return seconds


def _stage_seconds(model: whisper.Whisper, stage: str, arithmetic: str) -> float:
    """A window's work in one stage under `arithmetic`: an encoder pass, or STEPS_PER_WINDOW decoder steps (their
    mean over ROWS), on a copy of that stage only (fp32 on the stage itself, which it leaves as it is)."""
    # Every model now measures its decoder (fp16 is a candidate for all): a needless fp32 copy would hold a
    # second decoder in memory at start-up (large-v3's: 0.9 billion parameters, 3.6 GB).
    own = model.encoder if stage == "encoder" else model.decoder
    copied = own if arithmetic == "none" else copy.deepcopy(own)
    swap_linears(copied, arithmetic)
    with torch.no_grad():
        if stage == "encoder":
            mel = torch.zeros(1, model.dims.n_mels, 2 * model.dims.n_audio_ctx)
            return _best_of(2, lambda: copied(mel))
        project = projection(copied, arithmetic)
        steps = [_best_of(5, partial(_decoder_step, copied, project, rows)) for rows in ROWS]
    return STEPS_PER_WINDOW * sum(steps) / len(steps)


def _decoder_step(decoder: TextDecoder, project: Projection, rows: int) -> Tensor:
    """A decoder step's Linear work on `rows` new tokens (attention over the caches aside), then the logits."""
    x = torch.zeros(rows, decoder.token_embedding.embedding_dim)
    for block in decoder.blocks:
        h = block.attn_ln(x)
        x = x + block.attn.out(block.attn.query(h) + block.attn.key(h) + block.attn.value(h))
        x = x + block.cross_attn.out(block.cross_attn.query(block.cross_attn_ln(x)))
        x = x + block.mlp(block.mlp_ln(x))
    return project(decoder.ln(x))


def _best_of(runs: int, work: Callable[[], Any]) -> float:
    """The shortest of `runs` timed runs of `work`, after one untimed run (allocations, kernel choice)."""
    work()
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return min(timings)


#: The flags that decide which arithmetic is fast: one model name covers CPUs with and without them.
_UNITS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def _cpu_model() -> str:
    """The CPU's model name and the matrix units it has, as /proc/cpuinfo says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return f"{name} ({' '.join(unit for unit in _UNITS if unit in flags)})"


def _read(cache: Path) -> dict[str, Any]:
    try:
        known: dict[str, Any] = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return known
