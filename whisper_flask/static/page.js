// The web page (ARCHITECTURE.md, "The web page"). Everything the server sends back (file names,
// transcripts, error messages) is inserted with textContent, never as HTML: it is untrusted.
"use strict";

(() => {
  const KEY_ITEM = "whisper_flask.key";
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  const PAGE_SIZE = 10;
  const POLL_MS = 1000;
  const STAGES = {
    queued: "Queued",
    fetching: "Fetching the audio",
    decoding_audio: "Decoding audio",
    transcribing: "Transcribing",
    diarizing: "Labelling speakers",
    writing: "Writing the transcript",
    waiting_for_storage: "Waiting for disk space",
    done: "Done",
  };
  // What the recorder says when a live session ends, by the server's reason for ending it.
  const ENDINGS = {
    end: "Done",
    idle: "Ended: nothing was heard for too long.",
    shutting_down: "Ended early: the server is restarting. The text so far is kept.",
  };
  const STATUSES = { completed: "Done", failed: "Failed", cancelled: "Cancelled", pending: "Queued", in_progress: "Working" };

  const root = document.body.dataset.root; // "" at /, "/prefix" under a sub-path (request.script_root)
  const maxUploadBytes = Number(document.body.dataset.maxUploadMb) * 1024 * 1024;
  const byId = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  let uploads = Promise.resolve(); // files are sent one after another, in the order they were added
  let cards = []; // this key's cards; a new key starts with none
  let jobsPage = 0;
  let jobsRequest = 0; // only the latest job-list request may draw the table

  class ApiFailure extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  // ---- the key: in sessionStorage, sent as a Bearer header, so no cookie and no CSRF surface ----

  const key = () => sessionStorage.getItem(KEY_ITEM);

  function askForKey(message) {
    // Leaving a key ends everything it started in this page: its requests stop, and what it
    // showed (cards, transcripts, signed links, the job list) goes before another key is entered.
    sessionStorage.removeItem(KEY_ITEM);
    for (const card of cards) card.close();
    cards = [];
    leaveRecording();
    uploads = Promise.resolve();
    byId("cards").replaceChildren();
    byId("jobs-body").replaceChildren();
    byId("app").hidden = true;
    byId("key-state").hidden = true;
    byId("key-section").hidden = false;
    byId("key-error").textContent = message;
    byId("key-input").focus();
  }

  function showApp() {
    byId("key-section").hidden = true;
    byId("key-error").textContent = "";
    byId("key-state").hidden = false;
    byId("app").hidden = false;
    loadJobs(0); // a wrong key answers 401 here, which brings the key form back
  }

  function useKey(event) {
    event.preventDefault();
    const value = byId("key-input").value.trim();
    if (!/^[\x21-\x7e]+$/.test(value)) {
      byId("key-error").textContent = "An API key has no spaces or special characters; paste it again.";
      return;
    }
    sessionStorage.setItem(KEY_ITEM, value);
    byId("key-input").value = "";
    showApp();
    byId("pick-files").focus();
  }

  // ---- errors in plain words ----

  function explain(status, bodyText, retryAfter) {
    let detail = "";
    let code = "";
    try {
      ({ error: detail = "", code = "" } = JSON.parse(bodyText));
    } catch {
      // not JSON (a proxy's own page): the status says enough
    }
    const said = detail ? ` ${detail.charAt(0).toUpperCase()}${detail.slice(1).replace(/\.?$/, ".")}` : "";
    const wait = /^\d+$/.test(retryAfter ?? "") ? ` Try again in ${retryAfter} seconds.` : "";
    if (status === 0) return "The server could not be reached. Check the connection and try again.";
    if (status === 401) return "Your API key was not accepted. Enter it again.";
    if (status === 413) return `This file is too large.${said}`;
    if (code === "too_many_failures") return `Too many wrong keys were sent from this address.${wait}`;
    if (status === 429 || status === 503) return `The service is busy.${said}${wait}`;
    if (status >= 400 && status < 500) return `Refused.${said || ` The server answered ${status}.`}`;
    return `The server failed (${status}).${said}`;
  }

  async function api(method, path) {
    let response;
    try {
      response = await fetch(root + path, { method, headers: { Authorization: `Bearer ${key()}` } });
    } catch {
      throw new ApiFailure(explain(0, "", null), 0);
    }
    const text = await response.text();
    if (response.ok) return JSON.parse(text);
    const message = explain(response.status, text, response.headers.get("Retry-After"));
    if (response.status === 401) askForKey(message);
    throw new ApiFailure(message, response.status);
  }

  // ---- formatting ----

  function clock(seconds) {
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600);
    const mm = String(Math.floor((s % 3600) / 60)).padStart(h ? 2 : 1, "0");
    const ss = String(s % 60).padStart(2, "0");
    return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
  }

  function timestamp(seconds) {
    return `${clock(Math.floor(seconds))}.${String(Math.floor((seconds % 1) * 10))}`;
  }

  function megabytes(bytes) {
    return `${(Math.ceil(bytes / 1024 / 102.4) / 10).toFixed(1)} MB`; // rounded up: 2 MB + 1 byte is 2.1
  }

  // ---- one card per file or saved recording: upload, progress, cancel, downloads, transcript ----

  class Card {
    // `name` is a file's, or a recording's; `note` says how big it is (a size, a length).
    constructor(name, note) {
      this.name = name;
      this.jobId = null;
      this.ended = false;
      this.closed = false;
      this.node = byId("card-template").content.firstElementChild.cloneNode(true);
      this.part = (selector) => this.node.querySelector(selector);
      this.part(".name").textContent = name;
      this.part(".size").textContent = note;
      this.part("progress").setAttribute("aria-label", `Progress of ${name}`);
      this.part(".cancel").addEventListener("click", () => this.cancel());
      this.part(".show-transcript").addEventListener("click", () => this.toggleTranscript());
      this.part(".copy").addEventListener("click", () => this.copy());
      this.state("Waiting to upload");
      byId("cards").prepend(this.node);
    }

    close() {
      this.closed = true; // its loops stop at their next turn
      this.xhr?.abort();
    }

    state(text, detail = "") {
      // Rewriting the live region with the same words would make screen readers repeat them.
      if (this.part(".state").textContent !== text) this.part(".state").textContent = text;
      this.part(".detail").textContent = detail;
    }

    fail(message) {
      this.ended = true;
      this.part(".error").textContent = message;
      this.hideCancel();
      this.node.classList.add("failed");
    }

    finish(text, detail = "") {
      this.ended = true;
      this.state(text, detail);
      this.hideCancel();
    }

    hideCancel() {
      const button = this.part(".cancel");
      if (document.activeElement === button) this.part(".state").focus(); // keep keyboard focus in the card
      button.hidden = true;
    }

    cancelled(detail = "") {
      this.finish("Cancelled", detail);
      this.node.classList.add("cancelled");
    }

    upload(file, options) {
      if (this.ended || this.closed) return Promise.resolve();
      if (file.size > maxUploadBytes) {
        this.state("Not sent");
        this.fail(`This file is too large: ${megabytes(file.size)}; the limit is ${megabytes(maxUploadBytes)}.`);
        return Promise.resolve();
      }
      return new Promise((resolve) => {
        const form = new FormData();
        form.append("file", file, file.name);
        for (const [name, value] of options) form.append(name, value);
        const xhr = new XMLHttpRequest(); // fetch cannot report upload progress
        this.xhr = xhr;
        xhr.open("POST", `${root}/upload`);
        xhr.setRequestHeader("Authorization", `Bearer ${key()}`);
        xhr.upload.addEventListener("progress", (event) => {
          if (!event.lengthComputable) return;
          const percent = (100 * event.loaded) / event.total;
          this.part("progress").value = percent;
          this.state("Uploading", `${megabytes(event.loaded)} of ${megabytes(event.total)} (${Math.floor(percent)} %)`);
        });
        // Once the whole body is out, the server may have queued the job already: a cancel then
        // waits for the job's id instead of dropping the answer that carries it.
        xhr.upload.addEventListener("load", () => {
          this.sent = true;
        });
        xhr.addEventListener("loadend", () => {
          this.xhr = null;
          if (xhr.status === 202) {
            this.follow(JSON.parse(xhr.responseText));
          } else if (!this.ended && !this.closed) {
            this.state("Not sent");
            this.fail(explain(xhr.status, xhr.responseText, xhr.getResponseHeader("Retry-After")));
            if (xhr.status === 401) askForKey(explain(401, "", null));
          }
          resolve();
        });
        this.state("Uploading", "");
        xhr.send(form);
      });
    }

    async follow(job) {
      this.jobId = job.transcription_id;
      if (this.cancelWanted) await this.cancel();
      else this.show(job);
      let wait = POLL_MS;
      while (!this.ended && !this.closed) {
        await sleep(wait);
        if (this.closed) return;
        wait = POLL_MS;
        try {
          this.show(await api("GET", `/progress/${encodeURIComponent(this.jobId)}`));
        } catch (error) {
          if (error.status === 0 || error.status === 429 || error.status >= 500) {
            this.part(".detail").textContent = `${error.message} Still trying.`;
            wait = 5 * POLL_MS; // a busy or unreachable server is asked less often
          } else if (error.status !== 401) {
            this.fail(error.message); // gone, expired or refused: asking again will not help
          }
        }
      }
      if (!this.closed) loadJobs(jobsPage);
    }

    show(job) {
      if (this.ended && !TERMINAL.has(job.status)) return; // an answer older than the cancel
      // A stage with a percentage of its own (labelling speakers, after the transcription) fills the bar anew.
      const stageOwn = job.status === "in_progress" && job.stage_progress != null;
      this.part("progress").value = (stageOwn ? job.stage_progress : job.progress) ?? 0;
      if (job.status === "pending") {
        const position = job.queue_position ? ` (position ${job.queue_position})` : "";
        this.state(`Queued${position}`);
      } else if (stageOwn) {
        this.state(STAGES[job.stage] ?? job.stage, `${Math.floor(job.stage_progress)} %`);
      } else if (job.status === "in_progress") {
        const parts = [`${Math.floor(job.progress)} %`];
        if (job.duration) parts.push(`${clock(job.processed_seconds ?? 0)} of ${clock(job.duration)}`);
        if (job.eta_seconds != null) parts.push(`about ${clock(job.eta_seconds)} left`);
        this.state(STAGES[job.stage] ?? job.stage, parts.join(" · "));
      } else if (job.status === "completed") {
        this.finish("Done", job.duration ? `${clock(job.duration)} of audio` : "");
        this.offerTranscript(job.formats);
      } else if (job.status === "failed") {
        this.finish("Failed");
        this.fail(`The job failed: ${job.error || "no reason given"}`);
      } else if (job.status === "cancelled") {
        this.cancelled();
      }
    }

    offerTranscript(formats) {
      // The job's own formats, as the server lists them: .rttm comes only with a diarized job.
      const downloads = this.part(".downloads");
      for (const [fmt, url] of Object.entries(formats)) {
        const link = document.createElement("a");
        link.href = url;
        link.textContent = fmt;
        link.download = `${this.name.replace(/\.[^.]*$/, "")}.${fmt}`;
        downloads.append(" ", link);
      }
      this.formats = formats;
      downloads.hidden = false;
      this.part(".show-transcript").hidden = false;
    }

    async cancel() {
      if (this.xhr && !this.sent) {
        this.xhr.abort();
        this.cancelled("The upload was stopped.");
        return;
      }
      if (this.xhr) {
        this.cancelWanted = true; // follow() cancels as soon as the job's id arrives
        this.state("Cancelling");
        return;
      }
      if (!this.jobId) {
        this.cancelled("Not sent.");
        return;
      }
      try {
        this.show(await api("DELETE", `/jobs/${encodeURIComponent(this.jobId)}`));
      } catch (error) {
        this.part(".error").textContent = error.message;
      }
    }

    async toggleTranscript() {
      const panel = this.part(".transcript");
      const button = this.part(".show-transcript");
      if (!panel.hidden) {
        panel.hidden = true;
        button.setAttribute("aria-expanded", "false");
        button.textContent = "Show transcript";
        return;
      }
      if (!this.segments) {
        button.disabled = true; // one fetch, however often it is clicked
        let transcript;
        try {
          const response = await fetch(this.formats.json); // a signed link: no key needed
          if (!response.ok) throw new Error(explain(response.status, await response.text(), null));
          transcript = await response.json();
        } catch (error) {
          this.part(".error").textContent = error.message;
          return;
        } finally {
          button.disabled = false;
        }
        this.segments = transcript.segments;
        // A diarized transcript names its speakers: it is shown by turns, a segment otherwise.
        this.turns = transcript.speakers ? speakerTurns(this.segments) : null;
        const list = this.part(".segments");
        for (const part of this.turns ?? this.segments) {
          const time = document.createElement("time");
          time.textContent = `${timestamp(part.start)} → ${timestamp(part.end)}`;
          const item = document.createElement("li");
          if (this.turns) {
            const speaker = document.createElement("strong");
            speaker.className = "speaker";
            speaker.textContent = part.speaker ?? "–";
            const text = document.createElement("p");
            text.textContent = part.text;
            item.className = "turn";
            item.append(speaker, " ", time, text);
          } else {
            item.append(time, " ", part.text.trim());
          }
          list.append(item);
        }
      }
      panel.hidden = false;
      button.setAttribute("aria-expanded", "true");
      button.textContent = "Hide transcript";
    }

    async copy() {
      const text = this.turns
        ? this.turns.map((turn) => `${turn.speaker ?? "–"}: ${turn.text}`).join("\n\n") // as the .txt download
        : this.segments.map((segment) => segment.text.trim()).join("\n");
      const note = this.part(".copied");
      try {
        await navigator.clipboard.writeText(text); // only in secure contexts (HTTPS or localhost)
        note.textContent = "Copied.";
      } catch {
        const range = document.createRange();
        range.selectNodeContents(this.part(".segments"));
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        note.textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
      }
    }
  }

  function speakerTurns(segments) {
    // Consecutive segments of one speaker make a turn, as in the .txt download.
    const turns = [];
    for (const segment of segments) {
      const last = turns.at(-1);
      if (last && last.speaker === segment.speaker) {
        last.end = segment.end;
        last.text += ` ${segment.text.trim()}`;
      } else {
        turns.push({ speaker: segment.speaker, start: segment.start, end: segment.end, text: segment.text.trim() });
      }
    }
    return turns;
  }

  function languageAndTask() {
    // Only a multilingual model's page offers them: an English-only one has neither field.
    const options = [];
    const language = byId("language")?.value.trim();
    if (language) options.push(["language", language]);
    const task = byId("task")?.value;
    if (task && task !== "transcribe") options.push(["task", task]);
    return options;
  }

  function chosenOptions() {
    const options = languageAndTask();
    if (byId("word-timestamps").checked) options.push(["word_timestamps", "true"]);
    if (byId("diarize").checked) {
      options.push(["diarize", "true"]);
      for (const name of ["min_speakers", "max_speakers"]) {
        const count = byId(name.replace("_", "-")).value.trim(); // the server says what is wrong with it
        if (count) options.push([name, count]);
      }
    }
    return options;
  }

  function addFiles(files) {
    const options = chosenOptions();
    for (const file of files) {
      const card = new Card(file.name, megabytes(file.size));
      cards.push(card);
      // A card that throws must not stop the files after it.
      uploads = uploads.then(() => card.upload(file, options)).catch((error) => card.fail(`The page failed: ${error.message}`));
    }
  }

  // ---- live transcription from the microphone (live.js), kept as a job with a card of its own ----

  let recording = null; // the one LiveRecording this page runs, while it runs

  const liveText = () => byId("live-text");

  function liveState(words) {
    if (byId("live-state").textContent !== words) byId("live-state").textContent = words;
  }

  function recordingStopped() {
    recording = null;
    const stop = byId("stop-recording");
    const hadFocus = document.activeElement === stop;
    stop.disabled = true;
    byId("record").disabled = false;
    if (hadFocus) byId("record").focus(); // keyboard focus stays on the recorder
    liveText().querySelector(".partial").textContent = ""; // tentative text never outlives its session
    liveText().classList.remove("recording");
  }

  async function record() {
    const text = liveText();
    const final = text.querySelector(".final");
    const partial = text.querySelector(".partial");
    byId("live-error").textContent = "";
    final.textContent = "";
    partial.textContent = "";
    byId("record").disabled = true;
    liveState("Asking for the microphone");
    const recordedAt = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    const current = new window.WhisperLive.LiveRecording({
      root,
      workletUrl: document.body.dataset.worklet,
      query: [["save", "true"], ...languageAndTask()],
      token: async () => (await api("POST", "/live/token")).token,
      events: {
        state: liveState,
        partial: (message) => {
          partial.textContent = message.text;
        },
        final: (message) => {
          final.textContent += message.text; // Whisper's leading space parts it from the text before
          partial.textContent = ""; // the next partial follows the new final text
        },
        ended: (message) => {
          recordingStopped();
          liveState(ENDINGS[message.reason] ?? "Done");
          if (!final.textContent.trim()) final.textContent = "(Nothing was heard.)";
          if (message.job) {
            // The saved recording, transcribed again whole, as an upload would be: its card follows
            // the job to its downloads in every format and its transcript.
            const card = new Card(message.job.filename ?? "Recording", `${clock(current.seconds)}, recorded at ${recordedAt}`);
            cards.push(card);
            card.follow(message.job);
          }
        },
        failed: (words) => {
          recordingStopped();
          liveState("Stopped");
          byId("live-error").textContent = words;
        },
      },
    });
    recording = current;
    text.hidden = false;
    text.classList.add("recording");
    try {
      await current.start();
    } catch (error) {
      if (recording !== current) return; // left meanwhile (a forgotten key): nothing to tell
      recordingStopped();
      liveState("");
      byId("live-error").textContent = error.message;
      return;
    }
    if (recording !== current) return;
    byId("stop-recording").disabled = false;
    byId("stop-recording").focus();
  }

  function stopRecording() {
    byId("stop-recording").disabled = true;
    recording?.stop();
  }

  function leaveRecording() {
    recording?.close();
    recordingStopped();
    liveState("");
    byId("live-error").textContent = "";
    liveText().hidden = true;
    liveText().querySelector(".final").textContent = "";
  }

  // ---- the key's jobs, newest first, paged ----

  async function loadJobs(page) {
    const request = ++jobsRequest;
    let data;
    try {
      data = await api("GET", `/jobs?limit=${PAGE_SIZE}&offset=${page * PAGE_SIZE}`);
    } catch (error) {
      if (request === jobsRequest && key()) byId("jobs-error").textContent = error.message;
      return;
    }
    if (request !== jobsRequest) return; // a later request (another page, a refresh) has the say
    byId("jobs-error").textContent = "";
    jobsPage = page;
    const rows = data.jobs.map((job) => {
      const row = document.createElement("tr");
      const links = document.createElement("td");
      for (const [fmt, url] of Object.entries(job.formats ?? {})) {
        const link = document.createElement("a");
        link.href = url;
        link.textContent = fmt;
        link.download = "";
        links.append(link, " ");
      }
      const cells = [
        STATUSES[job.status] ?? job.status,
        job.filename,
        job.duration ? clock(job.duration) : "–",
        new Date(job.created_at).toLocaleString(),
      ].map((text) => {
        const cell = document.createElement("td");
        cell.textContent = text;
        return cell;
      });
      row.append(...cells, links);
      return row;
    });
    byId("jobs-body").replaceChildren(...rows);
    byId("jobs-page").textContent = rows.length ? `Page ${page + 1}` : page ? "No older jobs" : "No jobs yet";
    byId("jobs-newer").disabled = page === 0;
    byId("jobs-older").disabled = data.jobs.length < PAGE_SIZE;
  }

  // ---- wiring ----

  function wireDropZone() {
    const zone = byId("drop-zone");
    const input = byId("file-input");
    byId("pick-files").addEventListener("click", () => input.click());
    input.addEventListener("change", () => {
      addFiles(input.files);
      input.value = "";
    });
    for (const name of ["dragenter", "dragover"]) {
      zone.addEventListener(name, (event) => {
        event.preventDefault();
        zone.classList.add("dragging");
      });
    }
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      addFiles(event.dataTransfer.files);
    });
    // A file dropped beside the zone would make the browser leave the page to open it.
    for (const name of ["dragover", "drop"]) window.addEventListener(name, (event) => event.preventDefault());
  }

  function showSpeakerCounts() {
    byId("speaker-counts").hidden = !byId("diarize").checked; // the counts only go with diarize=true
  }

  byId("key-form").addEventListener("submit", useKey);
  byId("diarize").addEventListener("change", showSpeakerCounts);
  showSpeakerCounts(); // a reload may keep the box checked
  byId("forget-key").addEventListener("click", () => askForKey(""));
  byId("jobs-newer").addEventListener("click", () => loadJobs(Math.max(0, jobsPage - 1)));
  byId("jobs-older").addEventListener("click", () => loadJobs(jobsPage + 1));
  byId("jobs-refresh").addEventListener("click", () => loadJobs(jobsPage));
  byId("record").addEventListener("click", record);
  byId("stop-recording").addEventListener("click", stopRecording);
  wireDropZone();
  if (key()) showApp();
  else askForKey("");
})();
