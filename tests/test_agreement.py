"""LocalAgreement, the rule that makes live text final (engine/agreement.py)."""

from __future__ import annotations

import pytest

from whisper_flask.engine.agreement import LocalAgreement, Word, without_copies, without_repeated_end


def words(text: str, start: float = 0.0) -> list[Word]:
    """A hypothesis of `text`, a word every 0.3 s from `start`."""
    return [Word(f" {word}", start + 0.3 * index, start + 0.3 * index + 0.3) for index, word in enumerate(text.split())]


def spoken(confirmed: list[Word]) -> str:
    return "".join(word.text for word in confirmed).strip()


def test_words_are_final_once_two_successive_hypotheses_agree_on_them() -> None:
    """The prefix two decodes share is confirmed; what the second adds stays tentative."""
    agreement = LocalAgreement()
    assert agreement.confirm(words("the cat sat")) == []
    assert spoken(agreement.confirm(words("the cat sat on"))) == "the cat sat"
    assert spoken(agreement.tentative) == "on"


def test_agreed_words_ending_after_the_hold_line_stay_tentative() -> None:
    """Words two decodes agree on are final only up to `until`; the next decode may confirm the rest."""
    agreement = LocalAgreement()
    agreement.confirm(words("the cat sat on"))
    assert spoken(agreement.confirm(words("the cat sat on the"), until=0.6)) == "the cat"
    assert spoken(agreement.tentative) == "sat on the"
    assert spoken(agreement.confirm(words("the cat sat on the mat"), until=1.2)) == "sat on"


def test_a_hypothesis_that_changes_its_mind_confirms_only_what_it_kept() -> None:
    """Where the new hypothesis differs from the last, confirmation stops (case and punctuation aside)."""
    agreement = LocalAgreement()
    agreement.confirm(words("printing in the only"))
    assert spoken(agreement.confirm(words("Printing, in the early days"))) == "Printing, in the"


def test_confirmed_words_are_found_again_by_their_text_not_their_estimated_times() -> None:
    """A hypothesis whose times moved still repeats the confirmed words: none of them comes out twice."""
    agreement = LocalAgreement()
    agreement.confirm(words("one two three"))
    agreement.confirm(words("one two three four"))
    assert spoken(agreement.confirm(words("one two three four five", start=0.8))) == "four"


def test_after_a_cut_a_hypothesis_repeating_the_last_final_words_does_not_repeat_them() -> None:
    """When a cut came before the audio of final words, the next hypothesis's repeat of them is not final again."""
    agreement = LocalAgreement()
    agreement.confirm(words("if not from all the arts"))
    agreement.confirm(words("if not from all the arts and"))
    agreement.cut(10.0)  # every confirmed word has left the buffer, by its estimated time
    assert spoken(agreement.confirm(words("from all the arts and crafts"), everything=True)) == "and crafts"


def test_a_window_that_says_its_text_twice_is_final_once() -> None:
    """A forced final decode whose window repeats the confirmed words adds nothing twice."""
    agreement = LocalAgreement()
    agreement.confirm(words("represented in the exhibition"))
    agreement.confirm(words("represented in the exhibition"))
    twice = words("represented in the exhibition represented in the exhibition")
    assert agreement.confirm(twice, everything=True) == []


def test_a_decode_that_heard_no_words_changes_nothing_and_the_end_keeps_the_tentative_words() -> None:
    """An empty hypothesis neither clears the tentative words nor confirms them; at the end they become final."""
    agreement = LocalAgreement()
    agreement.confirm(words("although the"))
    agreement.confirm(words("although the Chinese took"))
    assert agreement.confirm([]) == [] and spoken(agreement.tentative) == "Chinese took"
    assert spoken(agreement.confirm([], everything=True)) == "Chinese took"
    assert agreement.tentative == [] and spoken(agreement.restart()) == "although the Chinese took"


def test_words_a_decode_copied_from_its_prompt_are_dropped() -> None:
    """Six or more words found in order in the prompt are the prompt copied, wherever they are in the hypothesis."""
    prompt = " Printing, then, for our purpose may be considered as the art of making books by means of movable types."
    copied = words("to form letterpress but also the art of making books by means of movable types now")
    assert spoken(without_copies(copied, prompt)) == "to form letterpress but also now"


@pytest.mark.parametrize("text", ["the art of making them", "making books by hand", "printing then"])
def test_fewer_than_six_words_said_again_are_kept(text: str) -> None:
    """A phrase of the prompt said again in under six words is speech, not a copy."""
    prompt = " Printing, then, for our purpose may be considered as the art of making books by means of movable types."
    assert spoken(without_copies(words(text), prompt)) == text


@pytest.mark.parametrize(
    ("heard", "kept"),
    [
        ("of the ancient Roman character of the ancient Roman character.", "of the ancient Roman character"),
        ("In this regard, in this regard,", "In this regard,"),
        ("in this regard in this regard in this regard", "in this regard"),
        ("New York, New York", "New York, New York"),
        ("in this regard in this regard we met", "in this regard in this regard we met"),
    ],
)
def test_a_phrase_of_three_words_or_more_said_twice_at_the_end_is_said_once(heard: str, kept: str) -> None:
    """Last words that only repeat the words before them are dropped, every time; shorter or inner repeats stay."""
    assert spoken(without_repeated_end(words(heard))) == kept
