"""Decoding on the model thread, with the real tiny.en model: a window decodes as it would alone."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import whisper
from whisper.audio import N_FRAMES, SAMPLE_RATE
from whisper.decoding import DecodingResult

from tests.helpers import FIXTURES, SPOKEN, start_model_thread, windows_per_step
from whisper_flask.engine import live_window
from whisper_flask.engine.batching import ModelThread, whisper_projection
from whisper_flask.engine.job_model import JobModel
from whisper_flask.engine.live_window import LiveDecoder
from whisper_flask.engine.options import Task
from whisper_flask.engine.quantize import Int8Linear, StageArithmetic, apply_arithmetic
from whisper_flask.engine.spectrogram import LogMel, accept_precomputed

OPTIONS = whisper.DecodingOptions(language="en", fp16=False)


@pytest.fixture(scope="module")
def tiny(model_dir: Path) -> tuple[whisper.Whisper, ModelThread]:
    """The fp32 tiny.en model and its model thread (module-wide: tests must not change it)."""
    model = whisper.load_model(str(model_dir / "tiny.en.pt"), device="cpu")
    return model, start_model_thread(model, whisper_projection(model.decoder))


@pytest.fixture(scope="module")
def tiny_int8(model_dir: Path) -> tuple[whisper.Whisper, ModelThread]:
    """tiny.en with int8 Linear layers, and its model thread."""
    model = whisper.load_model(str(model_dir / "tiny.en.pt"), device="cpu")
    return model, start_model_thread(model, apply_arithmetic(model, StageArithmetic("int8", "int8", "int8")).projection)


@pytest.fixture(scope="module")
def mels() -> list[torch.Tensor]:
    """One 30-second window per spoken fixture."""
    return [whisper.log_mel_spectrogram(whisper.pad_or_trim(whisper.load_audio(str(FIXTURES / n)))) for n in SPOKEN]


def encode(loaded: tuple[whisper.Whisper, ModelThread], mel: torch.Tensor) -> torch.Tensor:
    model, thread = loaded
    return thread.run(lambda: model.encoder(mel[None]))


def decode_at_once(
    thread: ModelThread, features: list[torch.Tensor], options: list[whisper.DecodingOptions], seed: int = 0
) -> list[DecodingResult]:
    """Decode each window on a thread of its own, all at the same time."""
    results: list[DecodingResult | None] = [None] * len(features)

    def decode(index: int) -> None:
        results[index] = thread.decode(features[index], options[index], seed)

    threads = [threading.Thread(target=decode, args=(index,)) for index in range(len(features))]
    for job in threads:
        job.start()
    for job in threads:
        job.join(300)  # a window of tiny.en takes seconds, even on a loaded machine
    assert not any(job.is_alive() for job in threads), "a window was still decoding after 300 s"
    assert all(result is not None for result in results)
    return results  # type: ignore[return-value]


@pytest.fixture
def widest_steps(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], int]]:
    """The most windows that shared a decoder step, as the model thread logged them."""
    with caplog.at_level(logging.DEBUG, logger="whisper_flask.engine.decoding"):
        yield lambda: max(windows_per_step(caplog))


@pytest.mark.parametrize(
    "options",
    [OPTIONS, dataclasses.replace(OPTIONS, without_timestamps=True)],
    ids=["timestamps", "no-timestamps"],
)
def test_windows_decoded_at_once_give_each_one_whispers_own_tokens(
    tiny: tuple[whisper.Whisper, ModelThread],
    mels: list[torch.Tensor],
    options: whisper.DecodingOptions,
    widest_steps: Callable[[], int],
) -> None:
    tokenizer = whisper.tokenizer.get_tokenizer(False)
    # Prompts of different lengths (and none): each window has its own positions and cache.
    prompts = [None, tokenizer.encode(" The quick brown fox."), [], tokenizer.encode(" " + "word " * 40)]
    each = [dataclasses.replace(options, prompt=prompt) for prompt in prompts]
    alone = [whisper.decode(tiny[0], mel, opts) for mel, opts in zip(mels, each, strict=True)]
    together = decode_at_once(tiny[1], [encode(tiny, mel) for mel in mels], each)
    assert widest_steps() > 1
    assert [result.tokens for result in together] == [result.tokens for result in alone]
    assert [result.text for result in together] == [result.text for result in alone]
    assert [r.avg_logprob for r in together] == pytest.approx([r.avg_logprob for r in alone], rel=1e-4)
    assert [r.no_speech_prob for r in together] == pytest.approx([r.no_speech_prob for r in alone], rel=1e-3, abs=1e-6)


def test_with_int8_a_window_decodes_bit_for_bit_as_alone(
    tiny_int8: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor], widest_steps: Callable[[], int]
) -> None:
    features = [encode(tiny_int8, mel) for mel in mels]
    options = [OPTIONS] * len(features)
    alone = [decode_at_once(tiny_int8[1], [f], [OPTIONS])[0] for f in features]
    together = decode_at_once(tiny_int8[1], features, options)
    assert widest_steps() > 1
    for one, other in zip(alone, together, strict=True):
        assert one.tokens == other.tokens
        assert (one.avg_logprob, one.no_speech_prob) == (other.avg_logprob, other.no_speech_prob)


def test_windows_beyond_the_batch_size_wait_for_a_place(
    tiny: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor], widest_steps: Callable[[], int]
) -> None:
    model = tiny[0]
    one_at_a_time = start_model_thread(model, whisper_projection(model.decoder), size=1)
    features = [encode(tiny, mel) for mel in mels[:3]]
    results = decode_at_once(one_at_a_time, features, [OPTIONS] * 3)
    assert widest_steps() == 1
    assert [r.tokens for r in results] == [whisper.decode(model, mel, OPTIONS).tokens for mel in mels[:3]]


def test_beam_search_decodes_as_whisper_does(
    tiny: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor]
) -> None:
    options = dataclasses.replace(OPTIONS, beam_size=3)
    expected = [whisper.decode(tiny[0], mel, options) for mel in mels[:2]]
    results = decode_at_once(tiny[1], [encode(tiny, mel) for mel in mels[:2]], [options] * 2)
    assert [result.tokens for result in results] == [result.tokens for result in expected]


def test_sampling_depends_on_the_window_seed_only(
    tiny: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor]
) -> None:
    options = dataclasses.replace(OPTIONS, temperature=1.0, best_of=3)
    features = [encode(tiny, mel) for mel in mels]
    alone = decode_at_once(tiny[1], features[:1], [options], seed=11)[0]
    beside_others = decode_at_once(tiny[1], features, [options] * len(features), seed=11)[0]
    other_seed = decode_at_once(tiny[1], features[:1], [options], seed=12)[0]
    assert beside_others.tokens == alone.tokens
    assert other_seed.tokens != alone.tokens


def test_a_reservation_keeps_every_other_thread_off_the_model(
    tiny: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor]
) -> None:
    model, thread = tiny
    other_ran = threading.Event()
    thread.reserve()
    try:
        other = threading.Thread(target=lambda: (encode(tiny, mels[0]), other_ran.set()))
        other.start()
        # The reserving thread's own calls still run, while the other thread's wait.
        assert encode(tiny, mels[1]).shape == (1, model.dims.n_audio_ctx, model.dims.n_audio_state)
        assert not other_ran.wait(0.5)
    finally:
        thread.release()
    assert other_ran.wait(30)
    other.join(30)


def test_int8_linear_rows_do_not_depend_on_each_other() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    rows = torch.randn(5, 64) * torch.tensor([1.0, 30.0, 0.01, 5.0, 1.0])[:, None]
    int8 = Int8Linear(layer.weight, layer.bias)
    together = int8(rows)
    assert all(torch.equal(together[i], int8(rows[i : i + 1])[0]) for i in range(len(rows)))
    expected = layer(rows).detach()
    assert torch.allclose(together, expected, rtol=0.05, atol=0.05 * float(expected.abs().max()))


def test_int8_model_still_hears_the_words(
    tiny_int8: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor]
) -> None:
    model, thread = tiny_int8
    assert not any(isinstance(module, torch.nn.Linear) for module in model.modules())
    results = decode_at_once(thread, [encode(tiny_int8, mel) for mel in mels], [OPTIONS] * len(mels))
    for result, phrases in zip(results, SPOKEN.values(), strict=True):
        assert all(phrase.lower() in result.text.lower() for phrase in phrases), result.text


def test_a_check_that_raises_stops_a_window_at_its_next_step_and_frees_its_place(
    tiny: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor]
) -> None:
    steps = 0

    def cancelled_after_three_steps() -> None:
        nonlocal steps
        steps += 1
        if steps > 3:
            raise RuntimeError("the job was cancelled")

    features = encode(tiny, mels[0])
    with pytest.raises(RuntimeError, match="the job was cancelled"):
        tiny[1].decode(features, OPTIONS, 0, cancelled_after_three_steps)
    assert steps == 4, "the window stopped at the step after the check first raised"
    # Its place in the steps is free again: a window beside it decodes as if alone.
    assert decode_at_once(tiny[1], [features], [OPTIONS])[0].tokens == whisper.decode(tiny[0], mels[0], OPTIONS).tokens


class StuckDecoder:
    """A model thread whose every window ends in the pair <|0.00|><|0.00|>, which moves Whisper's seek by 0."""

    def __init__(self) -> None:
        self.decoded_at: list[int] = []

    def run(self, call: Callable[[], Any]) -> Any:
        return torch.zeros(1, 1500, 384)  # an encoder output; nothing reads it

    def decode(self, features: torch.Tensor, options: Any, seed: int, check: Callable[[], None]) -> DecodingResult:
        self.decoded_at.append(seed)
        tokenizer = whisper.tokenizer.get_tokenizer(False)
        zero = tokenizer.timestamp_begin
        tokens = [zero, *tokenizer.encode(" Hello."), zero, zero]
        return DecodingResult(features, "en", tokens=tokens, text=" Hello.", avg_logprob=-0.1, no_speech_prob=0.0,
                              temperature=options.temperature, compression_ratio=1.0)  # fmt: skip

    def release(self) -> None:
        """Nothing is reserved."""

    def reserve(self) -> None:
        """Nothing is reserved."""


def test_a_window_that_would_keep_whispers_loop_where_it_is_is_skipped_once_seen_twice() -> None:
    model = SimpleNamespace(device=torch.device("cpu"), is_multilingual=False, num_languages=99,
                            dims=SimpleNamespace(n_mels=80, n_audio_ctx=1500, n_text_ctx=448))  # fmt: skip
    thread = StuckDecoder()
    job_model = JobModel(model, thread, lambda window: None, lambda: None, ([], []), False)  # type: ignore[arg-type]
    mel = torch.zeros(80, 4000 + N_FRAMES)
    accept_precomputed()
    result: dict[str, Any] = {}
    loop = threading.Thread(
        target=lambda: result.update(whisper.transcribe(job_model, LogMel(mel), language="en", fp16=False)),
        daemon=True,  # without the guard it never ends
    )
    loop.start()
    loop.join(timeout=60)
    assert not loop.is_alive(), "Whisper's loop never ended"
    assert thread.decoded_at == [0, 0, 3000, 3000]  # each stuck window decoded once more, then skipped
    assert len(result["segments"]) == 2  # each stuck window's first decode (instantaneous, so without text)


@pytest.mark.parametrize("kind", ["whole", "half", "wrong-from-the-fifth", "longer"])
def test_a_greedy_decode_given_a_draft_ends_as_without_one_in_fewer_steps(
    tiny: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Each token a draft gets right saves a decoder step, and the result is the one decoded without a draft."""
    thread = tiny[1]
    features = encode(tiny, mels[0])
    steps: list[int] = []
    step = thread.step
    monkeypatch.setattr(thread, "step", lambda window, tokens: steps.append(1) or step(window, tokens))
    plain = thread.decode(features, OPTIONS, 0)
    plain_steps, tokens = len(steps), list(plain.tokens)
    drafts = {
        "whole": (tokens, len(tokens)),
        "half": (tokens[: len(tokens) // 2], len(tokens) // 2),
        "wrong-from-the-fifth": (tokens[:4] + [tokens[5], tokens[4]] + tokens[6:], 4),
        "longer": (tokens + tokens[:5], len(tokens)),
    }
    draft, right = drafts[kind]
    steps.clear()
    drafted = thread.decode(features, OPTIONS, 0, draft=draft)
    assert drafted.tokens == plain.tokens and drafted.text == plain.text
    assert drafted.avg_logprob == pytest.approx(plain.avg_logprob, abs=1e-4)
    assert drafted.no_speech_prob == pytest.approx(plain.no_speech_prob, abs=1e-4)
    assert len(steps) == plain_steps - right


def test_a_live_buffer_growing_decodes_as_each_buffer_would_alone(tiny: tuple[whisper.Whisper, ModelThread]) -> None:
    """A live session's decodes of its growing buffer (each drafted from the last) read as fresh decodes of each."""
    model, thread = tiny
    audio = whisper.load_audio(str(FIXTURES / "lj001-0001.flac"))
    session = LiveDecoder(model, thread, "en", Task.TRANSCRIBE, encoder=model.encoder)
    for seconds in (2.0, 2.5, 3.0, 4.5, 5.0):
        buffer = audio[: int(seconds * SAMPLE_RATE)]
        fresh = LiveDecoder(model, thread, "en", Task.TRANSCRIBE, encoder=model.encoder)
        assert session(buffer, "") == fresh(buffer, "")


def test_a_short_live_buffer_that_whisper_reads_over_and_over_keeps_its_words(
    tiny: tuple[whisper.Whisper, ModelThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """tiny.en reads the first second of a recording again and again until the compression rule drops it all; cut
    at the repeat (RepeatStop), the decode keeps the words said once."""
    model, thread = tiny
    second = whisper.load_audio(str(FIXTURES / "lj001-0001.flac"))[:SAMPLE_RATE]
    kept = LiveDecoder(model, thread, "en", Task.TRANSCRIBE, encoder=model.encoder)(second, "")
    assert "".join(word.text for word in kept.words).lower().split()[0] == "printing"

    class NeverStops(live_window.RepeatStop):
        def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
            pass

    monkeypatch.setattr(live_window, "RepeatStop", NeverStops)
    assert LiveDecoder(model, thread, "en", Task.TRANSCRIBE, encoder=model.encoder)(second, "").words == ()


class PauseAtThirdStep:
    """A window's `check` that holds its decode before its third step until resumed, counting its steps."""

    def __init__(self) -> None:
        self.steps = 0
        self.paused, self.resume = threading.Event(), threading.Event()

    def __call__(self) -> None:
        """Count the step; at the third, wait for resume."""
        self.steps += 1
        if self.steps == 3:
            self.paused.set()
            assert self.resume.wait(30), "the test never resumed the live decode"


def start_live_decode(thread: ModelThread, features: torch.Tensor, pause: PauseAtThirdStep) -> threading.Thread:
    """A live decode of `features` on a thread of its own, returned once it is held before its third step."""
    decoder = threading.Thread(target=lambda: thread.decode(features, OPTIONS, 0, pause, urgent=True))
    decoder.start()
    assert pause.paused.wait(60), "the live decode never reached its third step"
    return decoder


def test_a_file_jobs_call_waits_while_a_live_decode_is_between_its_steps(
    tiny: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor]
) -> None:
    """A file job's encoder pass (0.35 s on `base`) does not run in the gap between a live decode's steps."""
    pause = PauseAtThirdStep()
    live = start_live_decode(tiny[1], encode(tiny, mels[0]), pause)
    encoded = threading.Event()
    file_job = threading.Thread(target=lambda: (encode(tiny, mels[1]), encoded.set()))
    file_job.start()
    try:
        assert not encoded.wait(0.5)
    finally:
        pause.resume.set()
    live.join(60)
    assert not live.is_alive()
    assert encoded.wait(60)
    file_job.join(60)


def test_a_live_sessions_call_waits_for_the_live_decode_that_started_before_it_came(
    tiny: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor]
) -> None:
    """Another session's encoder pass, asked for while a live decode is between its steps, runs once that decode
    has ended, not in the gap: with enough sessions, their passes would otherwise hold a long decode up for seconds."""
    model, thread = tiny
    pause = PauseAtThirdStep()
    live = start_live_decode(thread, encode(tiny, mels[0]), pause)
    started = threading.Event()
    steps_before_the_pass: list[int] = []
    call = threading.Thread(
        target=lambda: thread.run(
            lambda: (steps_before_the_pass.append(pause.steps), started.set(), model.encoder(mels[1][None])),
            urgent=True,
        )
    )
    call.start()
    try:
        assert not started.wait(0.5)
    finally:
        pause.resume.set()
    for waited in (live, call):
        waited.join(60)
        assert not waited.is_alive()
    assert pause.steps > 3 and steps_before_the_pass == [pause.steps]  # after the decode's last step


def test_a_live_sessions_call_goes_before_a_live_decode_that_started_after_it_came(
    tiny: tuple[whisper.Whisper, ModelThread], mels: list[torch.Tensor]
) -> None:
    """A session's encoder pass that was already waiting when another live decode started runs once the decodes
    older than it end, while that younger decode is still between its steps: the sessions' steps batch in waves."""
    model, thread = tiny
    features = encode(tiny, mels[0])
    older, younger = PauseAtThirdStep(), PauseAtThirdStep()
    decodes = [start_live_decode(thread, features, older)]
    started = threading.Event()
    call = threading.Thread(
        target=lambda: thread.run(lambda: (started.set(), model.encoder(mels[1][None])), urgent=True)
    )
    call.start()
    try:
        assert not started.wait(0.5)  # it waits for the older decode
        decodes.append(start_live_decode(thread, features, younger))  # a window needs no call to join the steps
        older.resume.set()
        decodes[0].join(60)
        # The younger decode is still held between its steps: only the older one held the call up.
        assert started.wait(30), "the waiting call did not run once the decode older than it ended"
    finally:
        older.resume.set()
        younger.resume.set()
    for waited in (*decodes, call):
        waited.join(60)
        assert not waited.is_alive()
