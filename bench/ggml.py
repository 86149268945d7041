"""Convert an openai-whisper checkpoint (.pt) into whisper.cpp's ggml model file, for bench/long_file.py.

    .venv/bin/python bench/ggml.py [--model base] [--model-dir DIR] [--out FILE] [--f32] [--check 16kHz.wav]

It writes the layout that whisper.cpp's own models/convert-pt-to-ggml.py writes (and whisper.cpp's
whisper_model_load reads), all little-endian:

1. magic 0x67676d6c, then eleven int32 hyperparameters: n_vocab, n_audio_ctx, n_audio_state,
   n_audio_head, n_audio_layer, n_text_ctx, n_text_state, n_text_head, n_text_layer, n_mels, ftype
   (1: 2-D weights in float16, 0: all float32);
2. the mel filterbank: int32 n_mels, int32 n_fft, then n_mels x n_fft float32 (whisper's assets/mel_filters.npz);
3. the BPE vocabulary: int32 count, then per token in rank order int32 length and its raw bytes
   (whisper's assets/multilingual.tiktoken or gpt2.tiktoken; whisper.cpp adds the special tokens itself);
4. every tensor of the state dict, squeezed: int32 n_dims, int32 name length, int32 type (0 f32, 1 f16),
   the dimensions innermost first, the name, then the data in C order. The convolutions' biases become
   [n, 1]; 1-D tensors, those biases and the positional embeddings stay float32 in an f16 file.

Unlike the original script this casts the f16 tensors explicitly: the original writes the checkpoint's
own dtype under an f16 tag, which is right only for OpenAI's half-precision checkpoints.
Everything comes from the checkpoint and the installed openai-whisper package; nothing is downloaded.
"""

from __future__ import annotations

import base64
import os
import struct
import tempfile
from pathlib import Path
from typing import IO

import numpy as np
import torch
import whisper

MAGIC = 0x67676D6C  # "ggml"
ASSETS = Path(whisper.__file__).resolve().parent / "assets"
# Kept in float32 even in an f16 file, as whisper.cpp expects (besides every tensor of fewer than 2 dimensions).
F32_TENSORS = frozenset(
    {"encoder.conv1.bias", "encoder.conv2.bias", "encoder.positional_embedding", "decoder.positional_embedding"}
)
HPARAMS = (
    "n_vocab",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
    "n_mels",
)


def vocabulary(multilingual: bool) -> list[bytes]:
    """Whisper's BPE tokens in rank order, from the tiktoken file inside the openai-whisper package."""
    path = ASSETS / ("multilingual.tiktoken" if multilingual else "gpt2.tiktoken")
    ranked = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranked[int(rank)] = base64.b64decode(token)
    if sorted(ranked) != list(range(len(ranked))):
        raise ValueError(f"{path} does not rank its tokens 0..n-1")
    return [ranked[rank] for rank in range(len(ranked))]


def mel_filters(n_mels: int) -> np.ndarray:
    """Whisper's mel filterbank (n_mels x 201), from assets/mel_filters.npz inside the openai-whisper package."""
    with np.load(ASSETS / "mel_filters.npz") as filters:
        return np.asarray(filters[f"mel_{n_mels}"], dtype="<f4")


def write_ggml(checkpoint: dict[str, object], out: IO[bytes], f16: bool = True) -> None:
    """Write a loaded openai-whisper checkpoint ({"dims", "model_state_dict"}) to out in ggml format."""
    dims = checkpoint["dims"]
    state = checkpoint["model_state_dict"]
    assert isinstance(dims, dict) and isinstance(state, dict)
    out.write(struct.pack("<i", MAGIC))
    out.write(struct.pack("<11i", *(int(dims[name]) for name in HPARAMS), int(f16)))

    filters = mel_filters(int(dims["n_mels"]))
    out.write(struct.pack("<2i", *filters.shape))
    out.write(filters.tobytes())

    tokens = vocabulary(multilingual=int(dims["n_vocab"]) >= 51865)
    out.write(struct.pack("<i", len(tokens)))
    for token in tokens:
        out.write(struct.pack("<i", len(token)))
        out.write(token)

    for name, tensor in state.items():
        assert isinstance(tensor, torch.Tensor)
        data = tensor.detach().to(torch.float32).squeeze().numpy()
        if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
            data = data.reshape(data.shape[0], 1)
        half = f16 and data.ndim >= 2 and name not in F32_TENSORS
        data = np.ascontiguousarray(data, dtype="<f2" if half else "<f4")
        encoded = name.encode("utf-8")
        out.write(struct.pack("<3i", data.ndim, len(encoded), int(half)))
        out.write(struct.pack(f"<{data.ndim}i", *reversed(data.shape)))
        out.write(encoded)
        out.write(data.tobytes())


def convert_to_ggml(checkpoint_path: Path, target: Path, f16: bool = True) -> Path:
    """The ggml file for an openai-whisper checkpoint at target, converted once (atomically) if missing."""
    if target.is_file():
        return target
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as out:
        try:
            write_ggml(checkpoint, out, f16)
        except BaseException:
            out.close()
            os.unlink(out.name)
            raise
    os.replace(out.name, target)
    return target


def main() -> None:
    """Convert a model's checkpoint and, with --check, transcribe a 16 kHz WAV with it through pywhispercpp."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from whisper_flask.engine.checkpoints import ensure_checkpoint

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache" / "whisper")
    parser.add_argument("--out", type=Path, help="the ggml file (default: MODEL_DIR/ggml-MODEL.bin)")
    parser.add_argument("--f32", action="store_true", help="all tensors in float32")
    parser.add_argument("--check", type=Path, help="a 16 kHz mono 16-bit WAV to transcribe with the result")
    args = parser.parse_args()
    checkpoint = ensure_checkpoint(args.model, args.model_dir, allow_download=False)
    target = convert_to_ggml(checkpoint, args.out or args.model_dir / f"ggml-{args.model}.bin", f16=not args.f32)
    print(target)  # noqa: T201
    if args.check:
        from pywhispercpp.model import Model

        model = Model(str(target), redirect_whispercpp_logs_to=None, print_progress=False, language="en")
        print(" ".join(segment.text for segment in model.transcribe(str(args.check))))  # noqa: T201


if __name__ == "__main__":
    main()
