"""Validation of the transcription options a client may send (DESIGN 4, POST /upload)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

from .errors import ApiError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
MAX_PROMPT_CHARS = 2000


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_option", f"{field}: {message}", field=field)


def _language(value: str, multilingual: bool) -> str:
    code = value.strip().lower()
    code = code if code in LANGUAGES else TO_LANGUAGE_CODE.get(code, "")
    if not code:
        raise _invalid("language", f"unknown language {value!r}; use a code such as 'en' or a name such as 'German'")
    if not multilingual and code != "en":
        raise _invalid("language", "the loaded model is English-only")
    return code


def _task(value: str, multilingual: bool) -> str:
    if value not in ("transcribe", "translate"):
        raise _invalid("task", "must be 'transcribe' or 'translate'")
    if value == "translate" and not multilingual:
        raise _invalid("task", "the loaded model is English-only and cannot translate")
    return value


def _prompt(value: str, multilingual: bool) -> str:
    if len(value) > MAX_PROMPT_CHARS:
        raise _invalid("prompt", f"at most {MAX_PROMPT_CHARS} characters")
    return value


def _boolean(field: str) -> Callable[[str, bool], bool]:
    def parse(value: str, multilingual: bool) -> bool:
        if value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise _invalid(field, "must be true or false")

    return parse


def _number(field: str, low: float, high: float, kind: type[int] | type[float]) -> Callable[[str, bool], Any]:
    def parse(value: str, multilingual: bool) -> Any:
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise _invalid(field, f"must be {'an integer' if kind is int else 'a number'} from {low} to {high}")
        return number

    return parse


# form/query field -> (whisper.transcribe keyword, parser)
_FIELDS: dict[str, tuple[str, Callable[[str, bool], Any]]] = {
    "language": ("language", _language),
    "task": ("task", _task),
    "prompt": ("initial_prompt", _prompt),
    "initial_prompt": ("initial_prompt", _prompt),
    "word_timestamps": ("word_timestamps", _boolean("word_timestamps")),
    "temperature": ("temperature", _number("temperature", 0.0, 1.0, float)),
    "beam_size": ("beam_size", _number("beam_size", 1, 10, int)),
}


def parse_options(sources: list[Mapping[str, str]], multilingual: bool) -> dict[str, Any]:
    """Whisper keyword arguments from form fields and query parameters (the first source wins)."""
    options: dict[str, Any] = {}
    for field, (keyword, parse) in _FIELDS.items():
        value = next((source[field] for source in sources if source.get(field, "") != ""), None)
        if value is not None and keyword not in options:
            options[keyword] = parse(value, multilingual)
    return options
