"""The web page: served safely by Flask, and used in real Chromium against real gunicorn, nginx and `base`."""

from __future__ import annotations

import base64
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from playwright.sync_api import Browser, Locator, Page, Playwright, expect

from tests.helpers import FIXTURES, LiveClient, chromium, create_key, submit, upload, watched_page
from tests.servers import Servers
from whisper_flask.engine.checkpoints import ensure_checkpoint

KEYS = ("main", "errors", "keyboard", "subpath", "pager", "busy", "speakers")
MAX_JOBS_PER_KEY = 3
MAX_UPLOAD_MB = 2
SPEECH = FIXTURES / "lj001-0001.flac"  # LJ Speech, read aloud: "Printing, in the only sense ..."
XSS_NAME = "<img src=x onerror=alert(1)>.wav"
# LJ Speech's reader, espeak-ng (two sentences), the reader again: three turns, two speakers.
CONVERSATION = (SPEECH, FIXTURES / "fox.wav", FIXTURES / "report.wav", SPEECH)
#: The microphone's recording: SPEECH (9.7 s) after a second of quiet, two more after it.
SPOKEN_S = 12.7
#: Words of SPEECH that tiny.en hears, live or not; a few may come out misspelt.
SPOKEN_WORDS = ("printing", "only", "sense", "present", "differs", "arts", "crafts", "exhibition")


# -- served by Flask ---------------------------------------------------------------------------


def test_the_page_and_its_assets_need_no_key_and_run_no_inline_code(client: FlaskClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    html = page.get_data(as_text=True)
    scripts = re.findall(r"<script\b[^>]*>", html)
    assert scripts and all("src=" in tag for tag in scripts)
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers either
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        assert client.get(asset).status_code == 200, asset


def test_every_response_forbids_sniffing_and_referrers(client: FlaskClient) -> None:
    for path in ("/healthz", "/jobs", "/no-such-route"):
        headers = client.get(path).headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert "default-src 'none'" in headers["Content-Security-Policy"]


@pytest.mark.parametrize("multilingual", [True, False])
def test_language_and_task_are_offered_only_by_a_multilingual_model(
    make_app: Any, engine: Any, multilingual: bool
) -> None:
    engine.is_multilingual = multilingual
    html = make_app().test_client().get("/").get_data(as_text=True)
    assert ('<option value="German">de</option>' in html) is multilingual
    assert ('value="translate"' in html) is multilingual
    assert ("English only" in html) is not multilingual


# -- in a real browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(module_servers: Servers, model_dir: Path) -> dict[str, Any]:
    """gunicorn on `base` behind the shipped nginx site, which also serves the app under /speech/."""
    work = module_servers.work
    ensure_checkpoint("base", model_dir, allow_download=False)
    keys = {name: create_key(work, name) for name in KEYS}
    upstream, _ = module_servers.gunicorn(
        MODEL="base", PROXY_FIX="1", MAX_UPLOAD_MB=str(MAX_UPLOAD_MB), MAX_JOBS_PER_KEY=str(MAX_JOBS_PER_KEY)
    )
    http, _ = module_servers.nginx(max_body_mb=MAX_UPLOAD_MB, subpath=True)
    long_recording = work / "chapter-280s.opus"  # long enough to cancel while it runs
    subprocess.run(
        ["ffmpeg", "-v", "error", "-stream_loop", "3", "-i", str(FIXTURES / "lj001-chapter-70s.opus"),
         "-c", "copy", str(long_recording)],
        check=True,
    )  # fmt: skip
    # Tests prepare jobs on gunicorn's port: through nginx they would meet its upload rate limit.
    return {"url": f"http://127.0.0.1:{http}", "upstream": upstream, "keys": keys, "long": long_recording}


def open_with_key(page: Page, url: str, key: str) -> None:
    """Open the page and enter the key as a person would."""
    page.goto(url)
    page.get_by_label("Your API key").fill(key)
    page.get_by_role("button", name="Use this key").click()
    expect(page.get_by_role("heading", name="Your jobs")).to_be_visible()


def drop(page: Page, files: list[tuple[str, bytes]]) -> None:
    """Drop files on the drop zone, as a drag from the desktop delivers them."""
    payload = [(name, base64.b64encode(data).decode()) for name, data in files]
    page.evaluate(
        """(files) => {
            const transfer = new DataTransfer();
            for (const [name, data] of files) {
                const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
                transfer.items.add(new File([bytes], name));
            }
            const zone = document.getElementById("drop-zone");
            for (const kind of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(kind, {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }
        }""",
        payload,
    )


def card(page: Page, name: str) -> Locator:
    """The card of one file sent from the page."""
    return page.locator(".card").filter(has=page.locator(".name", has_text=name))


@pytest.mark.nginx
def test_a_wrong_key_is_refused_in_plain_words_and_the_right_one_opens_the_page(
    page: Page, site: dict[str, Any]
) -> None:
    page.goto(site["url"])
    page.get_by_label("Your API key").fill("wf_not-a-key")
    page.get_by_role("button", name="Use this key").click()
    expect(page.get_by_role("alert")).to_have_text("Your API key was not accepted. Enter it again.")
    expect(page.get_by_text("Drop audio or video files here")).to_be_hidden()
    open_with_key(page, site["url"], site["keys"]["main"])
    expect(page.get_by_text("No jobs yet")).to_be_visible()
    page.reload()  # the key lives in the tab's session storage, not in a cookie
    expect(page.get_by_role("heading", name="Your jobs")).to_be_visible()
    assert page.context.cookies() == []


@pytest.mark.nginx
def test_a_dropped_recording_reaches_100_percent_and_its_transcript_is_downloaded_shown_and_copied(
    page: Page, site: dict[str, Any], screenshots: Path
) -> None:
    open_with_key(page, site["url"], site["keys"]["main"])
    page.screenshot(path=screenshots / "1-empty.png", full_page=True)
    page.get_by_label("Language").fill("English")
    page.get_by_label("Word timestamps").check()
    drop(page, [(SPEECH.name, SPEECH.read_bytes()), ("chapter.opus", site["long"].read_bytes())])

    speech, long = card(page, SPEECH.name), card(page, "chapter.opus")
    expect(long.locator(".state")).to_have_text("Transcribing", timeout=60_000)
    expect(long.locator(".detail")).to_have_text(re.compile(r"^[1-9]\d* % · \d:\d\d of 4:40"), timeout=120_000)
    page.screenshot(path=screenshots / "2-in-progress.png", full_page=True)
    expect(speech.locator(".state")).to_have_text("Done", timeout=120_000)
    expect(speech.locator("progress")).to_have_js_property("value", 100)

    with page.expect_download() as download:
        speech.get_by_role("link", name="txt").click()
    assert download.value.suggested_filename == "lj001-0001.txt"
    assert "printing" in Path(download.value.path()).read_text().lower()

    speech.get_by_role("button", name="Show transcript").click()
    expect(speech.locator(".segments li").first).to_have_text(re.compile(r"^0:00\.0 → 0:0\d\.\d Printing, in the only"))
    expect(speech.locator(".segments")).to_contain_text("arts and crafts")
    speech.get_by_role("button", name="Copy text").click()
    expect(speech.locator(".copied")).to_have_text("Copied.")
    assert "printing" in page.evaluate("navigator.clipboard.readText()").lower()

    long.get_by_role("button", name="Cancel").click()
    expect(long.locator(".state")).to_have_text("Cancelled")
    page.get_by_role("button", name="Refresh").click()
    rows = page.locator("#jobs-body tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("chapter.opus")  # newest first
    expect(rows.nth(0)).to_contain_text("Cancelled")
    expect(rows.nth(1)).to_contain_text("Done")
    page.screenshot(path=screenshots / "3-done.png", full_page=True)
    client = LiveClient(site["upstream"], site["keys"]["main"])
    options = [job["options"] for job in client.get("/jobs").get_json()["jobs"]]
    assert options == [{"language": "en", "word_timestamps": True}] * 2


@pytest.mark.nginx
def test_labelled_speakers_are_shown_turn_by_turn_and_their_rttm_is_offered(
    page: Page, site: dict[str, Any], screenshots: Path, tmp_path: Path
) -> None:
    conversation = tmp_path / "conversation.flac"
    inputs = [arg for path in CONVERSATION for arg in ("-i", str(path))]
    mono = "".join(f"[{n}:a]aresample=16000,aformat=channel_layouts=mono[a{n}];" for n in range(len(CONVERSATION)))
    joined = "".join(f"[a{n}]" for n in range(len(CONVERSATION))) + f"concat=n={len(CONVERSATION)}:v=0:a=1"
    subprocess.run(["ffmpeg", "-v", "error", *inputs, "-filter_complex", mono + joined, str(conversation)], check=True)
    open_with_key(page, site["url"], site["keys"]["speakers"])
    expect(page.get_by_label("Speakers: at least")).to_be_hidden()  # the counts go only with diarize=true
    page.get_by_label("Label speakers").check()
    page.get_by_label("Speakers: at least").fill("2")
    page.get_by_label("at most", exact=True).fill("2")
    drop(page, [(conversation.name, conversation.read_bytes())])

    sent = card(page, conversation.name)
    expect(sent.locator(".state")).to_have_text("Labelling speakers", timeout=120_000)
    expect(sent.locator(".detail")).to_have_text(re.compile(r"^\d+ %$"))
    expect(sent.locator(".state")).to_have_text("Done", timeout=120_000)
    links = sent.locator(".downloads a")
    expect(links).to_have_text(["txt", "srt", "vtt", "json", "tsv", "rttm"])
    with page.expect_download() as download:
        sent.get_by_role("link", name="rttm").click()
    assert download.value.suggested_filename == "conversation.rttm"
    assert Path(download.value.path()).read_text().startswith("SPEAKER ")

    sent.get_by_role("button", name="Show transcript").click()
    turns = sent.locator(".segments .turn")
    expect(turns.locator(".speaker")).to_have_text(["A", "B", "A"])
    expect(turns.first).to_contain_text(re.compile(r"0:00\.0 → 0:\d\d\.\d\s*Printing, in the only"))
    page.screenshot(path=screenshots / "5-speakers.png", full_page=True)
    sent.get_by_role("button", name="Copy text").click()
    assert page.evaluate("navigator.clipboard.readText()").startswith("A: Printing, in the only")
    client = LiveClient(site["upstream"], site["keys"]["speakers"])
    job = client.get("/jobs").get_json()["jobs"][0]
    assert job["options"] == {"diarize": True, "min_speakers": 2, "max_speakers": 2}


@pytest.mark.nginx
def test_bad_files_get_their_reasons_beside_them_and_a_hostile_name_stays_text(
    page: Page, site: dict[str, Any]
) -> None:
    open_with_key(page, site["url"], site["keys"]["errors"])
    drop(
        page,
        [
            ("notes.wav", b"These are meeting notes, not audio.\n" * 20),
            ("huge.wav", bytes(MAX_UPLOAD_MB * 1024 * 1024 + 1)),
            (XSS_NAME, (FIXTURES / "fox.wav").read_bytes()),
        ],
    )
    expect(card(page, "notes.wav").locator(".error")).to_contain_text("Refused.")
    expect(card(page, "notes.wav").locator(".error")).to_contain_text("audio")
    expect(card(page, "huge.wav").locator(".error")).to_have_text(
        f"This file is too large: 2.1 MB; the limit is {MAX_UPLOAD_MB}.0 MB."
    )
    hostile = card(page, XSS_NAME)
    expect(hostile.locator(".state")).to_have_text("Done", timeout=120_000)
    expect(hostile.locator(".name")).to_have_text(XSS_NAME)
    page.get_by_role("button", name="Refresh").click()
    expect(page.locator("#jobs-body")).to_contain_text(XSS_NAME)
    assert page.locator("img").count() == 0  # the `page` fixture also fails on any dialog (alert)


@pytest.mark.nginx
def test_a_key_at_its_job_limit_is_told_to_wait_beside_the_refused_file(page: Page, site: dict[str, Any]) -> None:
    open_with_key(page, site["url"], site["keys"]["busy"])
    client = LiveClient(site["upstream"], site["keys"]["busy"])
    jobs = [submit(client, site["long"]) for _ in range(MAX_JOBS_PER_KEY)]
    try:
        drop(page, [("one-too-many.wav", (FIXTURES / "fox.wav").read_bytes())])
        error = card(page, "one-too-many.wav").locator(".error")
        expect(error).to_contain_text("The service is busy.")
        expect(error).to_contain_text(re.compile(r"Try again in \d+ seconds\."))
    finally:
        for job in jobs:
            client.delete(f"/jobs/{job}")


@pytest.mark.nginx
def test_the_page_works_from_the_keyboard_with_visible_focus_at_phone_width(
    page: Page, site: dict[str, Any], screenshots: Path
) -> None:
    page.set_viewport_size({"width": 375, "height": 740})
    # Listening from the start: Playwright intercepts file choosers only once a listener exists.
    page.on("filechooser", lambda chooser: chooser.set_files(FIXTURES / "fox.wav"))
    page.goto(site["url"])
    page.keyboard.press("Tab")  # the key field has focus already; Tab, Shift+Tab comes back to it
    page.keyboard.press("Shift+Tab")
    page.keyboard.type(site["keys"]["keyboard"])
    page.keyboard.press("Enter")
    pick = page.get_by_role("button", name="Choose files")
    expect(pick).to_be_focused()
    assert pick.evaluate("(node) => getComputedStyle(node).outlineStyle") != "none"
    page.keyboard.press("Shift+Tab")  # the option just before: Label speakers, whose counts then show
    expect(page.get_by_label("Label speakers")).to_be_focused()
    page.keyboard.press("Space")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Speakers: at least")).to_be_focused()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=screenshots / "4-phone-options.png")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Space")  # unchecked again: this file is not diarized
    page.keyboard.press("Tab")
    expect(pick).to_be_focused()
    page.keyboard.press("Enter")
    sent = card(page, "fox.wav")
    expect(sent.locator(".state")).to_have_text("Done", timeout=120_000)
    # Found by its role and accessible name: what a screen reader is given, with its value.
    expect(sent.get_by_role("progressbar", name="Progress of fox.wav")).to_have_js_property("value", 100)
    page.get_by_role("button", name="Refresh").click()
    expect(page.locator("#jobs-body tr")).to_have_count(1)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    wrap = page.locator(".table-wrap")
    assert wrap.evaluate("(node) => node.scrollWidth <= node.clientWidth"), "the job table fits without scrolling"
    page.screenshot(path=screenshots / "4-phone.png", full_page=True)
    page.get_by_role("button", name="Forget key").click()  # what the key showed goes with it
    expect(page.get_by_label("Your API key")).to_be_focused()
    expect(page.locator(".card")).to_have_count(0)
    expect(page.locator("#jobs-body tr")).to_have_count(0)


@pytest.mark.nginx
def test_the_page_works_under_a_sub_path_behind_nginx(page: Page, site: dict[str, Any]) -> None:
    open_with_key(page, f"{site['url']}/speech", site["keys"]["subpath"])
    assert page.url == f"{site['url']}/speech/"
    assert page.locator("#drop-zone").evaluate("(node) => getComputedStyle(node).borderStyle") == "dashed"
    drop(page, [(SPEECH.name, SPEECH.read_bytes())])
    sent = card(page, SPEECH.name)
    expect(sent.locator(".state")).to_have_text("Done", timeout=120_000)
    link = sent.get_by_role("link", name="txt")
    assert link.get_attribute("href").startswith("/speech/download/")
    with page.expect_download() as download:
        link.click()
    assert "printing" in Path(download.value.path()).read_text().lower()


@pytest.mark.nginx
def test_the_job_list_pages_through_a_keys_jobs_newest_first(page: Page, site: dict[str, Any]) -> None:
    client = LiveClient(site["upstream"], site["keys"]["pager"])
    for number in range(11):
        response = upload(client, FIXTURES / "fox.wav", filename=f"part-{number:02}.wav")
        assert response.status_code == 202
        client.delete(f"/jobs/{response.get_json()['transcription_id']}")  # listed all the same
    open_with_key(page, site["url"], site["keys"]["pager"])
    rows = page.locator("#jobs-body tr")
    expect(rows).to_have_count(10)
    expect(rows.first).to_contain_text("part-10.wav")
    expect(page.get_by_role("button", name="Newer")).to_be_disabled()
    page.get_by_role("button", name="Older").click()
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("part-00.wav")
    expect(page.get_by_text("Page 2")).to_be_visible()
    expect(page.get_by_role("button", name="Older")).to_be_disabled()
    page.get_by_role("button", name="Newer").click()
    expect(rows).to_have_count(10)


# -- recording from the microphone -------------------------------------------------------------


@pytest.fixture(scope="module")
def speaking_browser(playwright: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """Chromium whose microphone, once opened, says SPEECH (SPOKEN_S in all), then nothing; granted without asking."""
    recording = tmp_path_factory.mktemp("microphone") / "speech.wav"  # Chromium plays 16-bit PCM WAV only
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(SPEECH), "-af", "adelay=1000,apad=pad_dur=2", "-ac", "1",
         "-c:a", "pcm_s16le", str(recording)],
        check=True,
    )  # fmt: skip
    flags = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={recording}%noloop",
    ]
    launched = playwright.chromium.launch(executable_path=chromium(), args=flags)
    yield launched
    launched.close()


#: Notes, in the page, each text the partial span showed and how it looked: partials come and go faster
#: than the test could look, and one may be replaced before its style could be read.
WATCH_PARTIALS = """() => {
    window.partialsShown = [];
    const partial = document.querySelector("#live-text .partial");
    new MutationObserver(() => {
        if (!partial.textContent.trim()) return;
        const style = getComputedStyle(partial);
        window.partialsShown.push({text: partial.textContent, fontStyle: style.fontStyle, color: style.color});
    }).observe(partial, {childList: true, characterData: true, subtree: true});
}"""


def test_a_recording_shows_its_text_as_spoken_and_is_kept_as_a_job_whose_transcript_downloads(
    speaking_browser: Browser, servers: Servers, tmp_path: Path, screenshots: Path
) -> None:
    key = create_key(tmp_path, "speaker")
    port, _ = servers.gunicorn()
    with watched_page(speaking_browser) as page:  # a CSP that refused the socket or the worklet fails it too
        open_with_key(page, f"http://127.0.0.1:{port}", key)
        page.evaluate(WATCH_PARTIALS)
        final, state = page.locator("#live-text .final"), page.locator("#live-state")
        page.get_by_role("button", name="Record").click()
        spoken_by = time.monotonic() + SPOKEN_S  # the microphone starts at once: the page asks for it first
        expect(state).to_have_text("Recording", timeout=30_000)
        expect(page.get_by_role("button", name="Stop")).to_be_focused()
        # Before Stop: text made final as the session goes on (here at the pause after the speech, at the latest).
        expect(final).to_have_text(re.compile(r"\w"), timeout=60_000)
        page.screenshot(path=screenshots / "6-recording.png", full_page=True)
        page.wait_for_timeout(max(0.0, spoken_by - time.monotonic()) * 1000)
        page.get_by_role("button", name="Stop").click()
        expect(state).to_have_text("Done", timeout=60_000)

        text = final.inner_text().lower()
        heard = [word for word in SPOKEN_WORDS if word in text]
        assert len(heard) >= 5, text
        expect(page.locator("#live-text .partial")).to_be_empty()
        # Partials, when the server sent any (on a busy machine a decode may reach the pause first), looked
        # tentative; so does the place they are shown in.
        shown = page.evaluate("window.partialsShown")
        looks = page.locator("#live-text .partial").evaluate(
            "(node) => [getComputedStyle(node).fontStyle, getComputedStyle(node).color]"
        )
        assert looks == ["italic", "rgb(85, 89, 95)"]
        assert all([note["fontStyle"], note["color"]] == looks for note in shown), shown
        expect(page.locator("#live-error")).to_be_empty()

        saved = card(page, "live-session.wav")  # as the server names a recording, in the job list too
        expect(saved.locator(".size")).to_have_text(re.compile(r"^0:\d\d, recorded at "))
        minutes, seconds = saved.locator(".size").inner_text().split(",")[0].split(":")
        assert 60 * int(minutes) + int(seconds) >= int(SPOKEN_S)  # all that was sent, from Record to Stop
        expect(saved.locator(".state")).to_have_text("Done", timeout=120_000)
        expect(saved.locator(".downloads a")).to_have_text(["txt", "srt", "vtt", "json", "tsv"])
        with page.expect_download() as download:
            saved.get_by_role("link", name="txt").click()
        assert download.value.suggested_filename.endswith(".txt")  # named by the server (the recording has no name)
        assert "printing" in Path(download.value.path()).read_text().lower()
        page.screenshot(path=screenshots / "7-recorded.png", full_page=True)
