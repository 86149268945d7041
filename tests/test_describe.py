"""The API's description: OPTIONS, /openapi.json checked against the routes, /docs in Chromium, Schemathesis."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from playwright.sync_api import Page, expect
from schemathesis.checks import not_a_server_error

from tests.helpers import LiveClient, create_key, wait_for, wav_bytes
from tests.servers import Servers
from whisper_flask.api import describe
from whisper_flask.api.fields import FIELDS, parse_options
from whisper_flask.exceptions import InvalidOption

#: Served, but not part of the API: the page, its files, the documentation page.
NOT_API = {"static", "page.index", "describe.docs", "describe.docs_asset"}


def routes(app: Flask) -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every API route the app serves; OPTIONS only where a view answers it."""
    found = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in NOT_API:
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        automatic = {"HEAD", "OPTIONS"} if rule.provide_automatic_options else {"HEAD"}  # type: ignore[attr-defined]
        found |= {(path, method.lower()) for method in (rule.methods or set()) - automatic}
    return found


def test_the_description_has_exactly_the_apps_routes_and_methods(app: Flask, client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    described = {(path, method) for path, item in document["paths"].items() for method in item}
    assert described == routes(app)
    assert document["openapi"] == "3.1.0"


def test_the_upload_fields_described_are_the_fields_parsed(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    form = document["paths"]["/upload"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"file", "url", "callback_url", "email", *FIELDS}
    assert set(client.options("/upload").get_json()["fields"]) == set(form["properties"])


@pytest.mark.parametrize("name", [name for name, field in FIELDS.items() if "maximum" in field.schema])
def test_a_described_range_is_the_range_the_parser_accepts(name: str) -> None:
    schema, speakers = FIELDS[name].schema, {"diarize": "true"}  # the speaker counts need diarize
    for bound in (schema["minimum"], schema["maximum"]):
        parse_options([{name: str(bound)}, speakers], multilingual=True)
    with pytest.raises(InvalidOption):
        parse_options([{name: str(schema["maximum"] + 1)}, speakers], multilingual=True)


@pytest.mark.parametrize("name", ["limit", "offset"])
def test_a_described_paging_range_is_the_range_the_job_list_accepts(client: FlaskClient, name: str) -> None:
    schema = client.options("/jobs").get_json()["query"][name]
    parameters = client.get("/openapi.json").get_json()["paths"]["/jobs"]["get"]["parameters"]
    assert next(p["schema"] for p in parameters if p["name"] == name) == schema
    for value in (schema["minimum"], schema["maximum"]):
        assert client.get(f"/jobs?{name}={value}").status_code == 200
    for value in (schema["minimum"] - 1, schema["maximum"] + 1):
        assert client.get(f"/jobs?{name}={value}").status_code == 400


def test_the_openai_form_takes_exactly_the_described_values(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    form = document["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"]
    properties = form["schema"]["properties"]

    def status(**fields: str) -> int:
        data = {"file": (io.BytesIO(wav_bytes(1)), "tone.wav"), "model": "whisper-1", **fields}
        return client.post("/v1/audio/transcriptions", data=data).status_code

    for fmt in properties["response_format"]["enum"]:
        assert status(response_format=fmt) == 200, fmt
    assert status(response_format="xml") == 400
    assert properties["temperature"] == FIELDS["temperature"].schema  # the parser /upload uses
    assert status(temperature=str(properties["temperature"]["maximum"] + 0.5)) == 400
    granularity = properties["timestamp_granularities[]"]["items"]["enum"]
    assert status(response_format="verbose_json", **{"timestamp_granularities[]": granularity[-1]}) == 200
    assert status(response_format="verbose_json", **{"timestamp_granularities[]": "sentence"}) == 400


def test_the_job_schema_describes_every_field_of_a_served_job(client: FlaskClient) -> None:
    schema = client.get("/openapi.json").get_json()["components"]["schemas"]["Job"]
    data = {"file": (io.BytesIO(wav_bytes(1)), "tone.wav"), "diarize": "true"}  # every format: .rttm too
    job_id = client.post("/upload", data=data).get_json()["transcription_id"]
    wait_for(client, job_id, "completed")
    completed = client.get(f"/progress/{job_id}").get_json()
    assert set(completed) <= set(schema["properties"])
    assert set(completed["formats"]) == set(schema["properties"]["formats"]["properties"])


def test_options_list_each_fields_values_without_a_key(make_app: Any, engine: Any) -> None:
    engine.is_multilingual = False
    anonymous = make_app().test_client(use_cookies=False)
    anonymous.environ_base.pop("HTTP_AUTHORIZATION", None)
    fields = anonymous.options("/upload").get_json()["fields"]
    assert (fields["language"]["enum"], fields["task"]["enum"]) == (["en"], ["transcribe"])
    assert fields["beam_size"] == {"type": "integer", "minimum": 1, "maximum": 10}
    assert anonymous.options("/jobs").get_json()["query"]["status"]["enum"][0] == "pending"
    assert anonymous.options("/jobs/0123").get_json()["methods"] == ["GET", "DELETE"]


@pytest.fixture(scope="module")
def served(module_servers: Servers) -> dict[str, Any]:
    """Real gunicorn on tiny.en; wrong keys are not throttled here, so every generated request is answered."""
    key = create_key(module_servers.work, "fuzzer")
    port, _ = module_servers.gunicorn(AUTH_FAILURES_PER_MINUTE="1000000", MAX_JOBS_PER_KEY="1000")
    return {"url": f"http://127.0.0.1:{port}", "key": key}


def test_the_docs_page_renders_the_description_from_this_server_alone(
    page: Page, served: dict[str, Any], screenshots: Path
) -> None:
    page.goto(f"{served['url']}/docs")
    expect(page.get_by_role("heading", name=re.compile("whisper_flask"))).to_be_visible(timeout=20_000)
    expect(page.get_by_text("/upload").first).to_be_visible()
    page.screenshot(path=screenshots / "5-docs.png", full_page=False)


def _loopback_only(value: Any) -> Any:
    """Generated URLs point at a closed loopback port: the test sends nothing off this machine."""
    if isinstance(value, dict):
        return {key: "http://127.0.0.1:9/x" if key in ("url", "callback_url") else value[key] for key in value}
    return value


def described_routes(served: dict[str, Any]) -> set[tuple[str, str]]:
    """(path, method) of every operation the served description has."""
    document = LiveClient(int(served["url"].rsplit(":", 1)[1])).get("/openapi.json").get_json()
    return {(path, method) for path, item in document["paths"].items() for method in item}


def fuzz(operation: Any, served: dict[str, Any], failures: list[str]) -> int:
    """Send one operation's generated requests; record what got a 5xx; return how many were sent."""
    sent = 0

    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        nonlocal sent
        sent += 1
        case.body = _loopback_only(case.body)
        case.query = _loopback_only(case.query)
        try:
            case.call_and_validate(
                base_url=served["url"],
                headers={"Authorization": f"Bearer {served['key']}"},
                checks=[not_a_server_error],
                timeout=30,
            )
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
            raise

    with contextlib.suppress(Exception):  # recorded above; every operation gets its turn
        check()
    return sent


def test_no_generated_request_gets_a_server_error(served: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_url(f"{served['url']}/openapi.json", timeout=10)
    failures: list[str] = []
    sent = {result.ok().label: fuzz(result.ok(), served, failures) for result in schema.get_all_operations()}
    assert not failures, "\n\n".join(failures)
    described = {f"{method.upper()} {path}" for path, method in described_routes(served)}
    assert set(sent) == described - {"GET /openapi.json"}  # Schemathesis leaves out the description's own URL
    assert sum(sent.values()) > 200, sent


def test_the_openapi_document_is_built_once_per_app(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[bool] = []
    build = describe.openapi_document
    monkeypatch.setattr(describe, "openapi_document", lambda: built.append(True) or build())
    client = app.test_client()
    first, second = client.get("/openapi.json"), client.get("/openapi.json")
    assert len(built) == 1 and first.get_json() == second.get_json()
