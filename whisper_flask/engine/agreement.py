"""LocalAgreement: live text is confirmed once two successive decodes of the growing audio agree on it.

The policy of ufal's whisper_streaming (LocalAgreement-2): each decode of a live session's buffer is a
hypothesis of its words; the longest prefix that the previous hypothesis shares with the new one, up to a
line the caller sets (live.HOLD_S before the buffer's end), is confirmed and never changes again, the rest
stays tentative (ARCHITECTURE.md, "Live transcription").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: When no confirmed word is found again in a hypothesis, its words starting this long before the last
#: confirmed word's end are taken as confirmed ones (times within a segment are estimates).
OVERLAP_S = 0.1
#: The confirmed words' last ones (up to this many) are looked for in each new hypothesis: what follows is new.
TAIL_WORDS = 3
#: New words that begin with the last confirmed words (MIN_REPEAT to REPEAT_WORDS of them) repeat them: after
#: a cut, Whisper's segment end can come before the audio of the segment's last words; and a window can say
#: its text twice (seen at the end of a stream, where the repeat would have been made final).
REPEAT_WORDS, MIN_REPEAT = 12, 3
#: A run of this many words or more that a hypothesis shares, in order, with its prompt was copied from it: given
#: a buffer that ends in silence, Whisper may go on with the prompt's text (bench/live.py, 4 sessions: eleven
#: words of the prompt made final after a session's last word). Speech seldom says six words again within the
#: prompt's 200 characters.
COPY_WORDS = 6
_NOT_WORD = re.compile(r"[^\w]+")


@dataclass(frozen=True)
class Word:
    """A word of a live stream, its times in seconds from the stream's start (estimated within its segment)."""

    text: str  # as Whisper wrote it, with its leading space
    start: float
    end: float


def _same(first: Word, second: Word) -> bool:
    """Two hypotheses' words agree when they differ only in case and punctuation."""
    return _key(first.text) == _key(second.text)


class LocalAgreement:
    """A live stream's confirmed words still in its buffer, and its tentative rest."""

    def __init__(self) -> None:
        self._pending: list[Word] = []  # the last hypothesis, less what is confirmed
        self._kept: list[Word] = []  # confirmed words whose audio is still in the buffer, timed by the last hypothesis
        self._recent: list[Word] = []  # the last REPEAT_WORDS confirmed words, in the buffer or not

    @property
    def tentative(self) -> list[Word]:
        """The last hypothesis's words after the confirmed ones: they may still change."""
        return list(self._pending)

    @property
    def confirmed_until(self) -> float:
        """The end of the last confirmed word still in the buffer (0 if none)."""
        return self._kept[-1].end if self._kept else 0.0

    def confirm(self, hypothesis: list[Word], *, everything: bool = False, until: float = math.inf) -> list[Word]:
        """The words `hypothesis` confirms: what it shares with the previous one, up to `until` (all if `everything`).

        A hypothesis without words (Whisper dropped its window as silence or repetition, or it only copied its
        prompt) is no evidence against the words heard before it: it changes nothing, and when everything must
        be final the last tentative words are (as whisper_streaming's end does), rather than lost.
        """
        if not hypothesis and not everything:
            return []
        done, new = self._split(hypothesis) if hypothesis else (self._kept, self._pending)
        agreed = new if everything else []
        if not everything:
            for previous, word in zip(self._pending, new, strict=False):
                if not _same(previous, word) or word.end > until:
                    break
                agreed.append(word)
        self._pending = new[len(agreed) :]
        self._kept = done + agreed
        self._recent = (self._recent + agreed)[-REPEAT_WORDS:]
        return agreed

    def cut(self, at: float) -> list[Word]:
        """The buffer now starts at `at` (s): the confirmed words before it, which leave it."""
        gone = [word for word in self._kept if word.end <= at + 1e-6]
        self._kept = self._kept[len(gone) :]
        return gone

    def restart(self) -> list[Word]:
        """An empty buffer, nothing tentative: the confirmed words that were in it."""
        gone, self._kept, self._pending = self._kept, [], []
        return gone

    def _split(self, hypothesis: list[Word]) -> tuple[list[Word], list[Word]]:
        """The hypothesis as (the confirmed words it repeats, the rest)."""
        done, new = self._align(hypothesis)
        repeated = _repeats(self._recent, new)
        return done + new[:repeated], new[repeated:]

    def _align(self, hypothesis: list[Word]) -> tuple[list[Word], list[Word]]:
        """The hypothesis split after the confirmed words still in the buffer, found by their last words."""
        if not self._kept:
            return [], hypothesis
        for count in range(min(TAIL_WORDS, len(self._kept)), 0, -1):
            tail = self._kept[-count:]
            ends = [
                index + count
                for index in range(len(hypothesis) - count + 1)
                if all(_same(a, b) for a, b in zip(tail, hypothesis[index : index + count], strict=True))
            ]
            if ends:  # the place nearest to where the confirmed words should end
                end = min(ends, key=lambda found: abs(found - len(self._kept)))
                return hypothesis[:end], hypothesis[end:]
        until = self.confirmed_until - OVERLAP_S
        return self._kept, [word for word in hypothesis if word.start >= until]


def without_copies(hypothesis: list[Word], prompt: str) -> list[Word]:
    """The hypothesis less every run of COPY_WORDS or more of its words found in order in the prompt."""
    said = [_key(word) for word in prompt.split()]
    keys = [_key(word.text) for word in hypothesis]
    kept: list[Word] = []
    index = 0
    while index < len(hypothesis):
        copied = max((_common_run(keys, index, said, at) for at in range(len(said))), default=0)
        if copied >= COPY_WORDS:
            index += copied
        else:
            kept.append(hypothesis[index])
            index += 1
    return kept


def without_repeated_end(hypothesis: list[Word]) -> list[Word]:
    """The hypothesis less its last MIN_REPEAT or more words, as often as they only say the words before them again.

    Given a few seconds of audio, Whisper may read its last phrase twice ("of the ancient Roman character of the
    ancient Roman character."), too short a repeat for RepeatStop's six tokens. A phrase a speaker really says
    twice at an utterance's end is said once: seldom, and one phrase, where Whisper's repeats came at the end of
    short buffers again and again.
    """
    for count in range(len(hypothesis) // 2, MIN_REPEAT - 1, -1):
        end, before = hypothesis[-count:], hypothesis[-2 * count : -count]
        if all(_same(a, b) for a, b in zip(before, end, strict=True)):
            return without_repeated_end(hypothesis[:-count])
    return hypothesis


def _common_run(keys: list[str], index: int, said: list[str], at: int) -> int:
    """How many words from keys[index] on equal those from said[at] on."""
    length = 0
    while index + length < len(keys) and at + length < len(said) and keys[index + length] == said[at + length]:
        length += 1
    return length


def _key(text: str) -> str:
    return _NOT_WORD.sub("", text).casefold()


def _repeats(confirmed: list[Word], new: list[Word]) -> int:
    """How many of the new words, at least MIN_REPEAT, only repeat the last confirmed ones (0 if they do not)."""
    for count in range(min(len(confirmed), len(new)), MIN_REPEAT - 1, -1):
        if all(_same(a, b) for a, b in zip(confirmed[-count:], new[:count], strict=True)):
            return count
    return 0
