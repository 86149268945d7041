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
    decoding_audio: "Decoding audio",
    transcribing: "Transcribing",
    writing: "Writing the transcript",
    done: "Done",
  };
  const STATUSES = { completed: "Done", failed: "Failed", cancelled: "Cancelled", pending: "Queued", in_progress: "Working" };

  const root = document.body.dataset.root; // "" at /, "/prefix" under a sub-path (request.script_root)
  const maxUploadBytes = Number(document.body.dataset.maxUploadMb) * 1024 * 1024;
  const byId = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  let uploads = Promise.resolve(); // files are sent one after another, in the order they were added
  let jobsPage = 0;

  // ---- the key: in sessionStorage, sent as a Bearer header, so no cookie and no CSRF surface ----

  const key = () => sessionStorage.getItem(KEY_ITEM);

  function askForKey(message) {
    sessionStorage.removeItem(KEY_ITEM);
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
    sessionStorage.setItem(KEY_ITEM, byId("key-input").value.trim());
    byId("key-input").value = "";
    showApp();
    byId("pick-files").focus();
  }

  // ---- errors in plain words ----

  function explain(status, bodyText, retryAfter) {
    let detail = "";
    try {
      detail = JSON.parse(bodyText).error || "";
    } catch {
      // not JSON (a proxy's own page): the status says enough
    }
    const said = detail ? ` ${detail.charAt(0).toUpperCase()}${detail.slice(1).replace(/\.?$/, ".")}` : "";
    const wait = retryAfter ? ` Try again in ${retryAfter} seconds.` : "";
    if (status === 0) return "The server could not be reached. Check the connection and try again.";
    if (status === 401) return "Your API key was not accepted. Enter it again.";
    if (status === 413) return `This file is too large.${said}`;
    if (status === 429 || status === 503) return `The service is busy.${said}${wait}`;
    if (status >= 400 && status < 500) return `Refused.${said || ` The server answered ${status}.`}`;
    return `The server failed (${status}).${said}`;
  }

  async function api(method, path) {
    let response;
    try {
      response = await fetch(root + path, { method, headers: { Authorization: `Bearer ${key()}` } });
    } catch {
      throw new Error(explain(0, "", null));
    }
    const text = await response.text();
    if (response.ok) return JSON.parse(text);
    const message = explain(response.status, text, response.headers.get("Retry-After"));
    if (response.status === 401) askForKey(message);
    throw new Error(message);
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
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  // ---- one card per file: upload, progress, cancel, downloads, transcript ----

  class Card {
    constructor(file, options) {
      this.file = file;
      this.options = options;
      this.jobId = null;
      this.ended = false;
      this.node = byId("card-template").content.firstElementChild.cloneNode(true);
      this.part = (selector) => this.node.querySelector(selector);
      this.part(".name").textContent = file.name;
      this.part(".size").textContent = megabytes(file.size);
      this.part("progress").setAttribute("aria-label", `Progress of ${file.name}`);
      this.part(".cancel").addEventListener("click", () => this.cancel());
      this.part(".show-transcript").addEventListener("click", () => this.toggleTranscript());
      this.part(".copy").addEventListener("click", () => this.copy());
      this.state("Waiting to upload");
      byId("cards").prepend(this.node);
    }

    state(text, detail = "") {
      // Rewriting the live region with the same words would make screen readers repeat them.
      if (this.part(".state").textContent !== text) this.part(".state").textContent = text;
      this.part(".detail").textContent = detail;
    }

    fail(message) {
      this.ended = true;
      this.part(".error").textContent = message;
      this.part(".cancel").hidden = true;
      this.node.classList.add("failed");
    }

    upload() {
      if (this.ended) return Promise.resolve();
      if (this.file.size > maxUploadBytes) {
        this.state("Not sent");
        this.fail(`This file is too large: ${megabytes(this.file.size)}; the limit is ${megabytes(maxUploadBytes)}.`);
        return Promise.resolve();
      }
      return new Promise((resolve) => {
        const form = new FormData();
        form.append("file", this.file, this.file.name);
        for (const [name, value] of this.options) form.append(name, value);
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
        xhr.addEventListener("loadend", () => {
          this.xhr = null;
          if (xhr.status === 202) {
            this.follow(JSON.parse(xhr.responseText));
          } else if (!this.ended) {
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
      this.show(job);
      while (!TERMINAL.has(job.status)) {
        await sleep(POLL_MS);
        try {
          job = await api("GET", `/progress/${encodeURIComponent(this.jobId)}`);
        } catch (error) {
          this.part(".detail").textContent = `${error.message} Still trying.`;
          if (!key()) return;
          continue;
        }
        this.show(job);
      }
      loadJobs(jobsPage);
    }

    show(job) {
      const progress = this.part("progress");
      progress.value = job.progress ?? 0;
      if (job.status === "pending") {
        const position = job.queue_position ? ` (position ${job.queue_position})` : "";
        this.state(`Queued${position}`);
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

    finish(text, detail = "") {
      this.ended = true;
      this.state(text, detail);
      this.part(".cancel").hidden = true;
    }

    cancelled(detail = "") {
      this.finish("Cancelled", detail);
      this.node.classList.add("cancelled");
    }

    offerTranscript(formats) {
      for (const link of this.node.querySelectorAll("a[data-format]")) {
        link.href = formats[link.dataset.format];
        link.download = `${this.file.name.replace(/\.[^.]*$/, "")}.${link.dataset.format}`;
      }
      this.formats = formats;
      this.part(".downloads").hidden = false;
      this.part(".show-transcript").hidden = false;
    }

    async cancel() {
      if (this.xhr) {
        this.ended = true;
        this.xhr.abort();
        this.cancelled("The upload was stopped.");
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
        try {
          const response = await fetch(this.formats.json); // a signed link: no key needed
          if (!response.ok) throw new Error(explain(response.status, await response.text(), null));
          this.segments = (await response.json()).segments;
        } catch (error) {
          this.part(".error").textContent = error.message;
          return;
        }
        const list = this.part(".segments");
        for (const segment of this.segments) {
          const time = document.createElement("time");
          time.textContent = `${timestamp(segment.start)} → ${timestamp(segment.end)}`;
          const item = document.createElement("li");
          item.append(time, " ", segment.text.trim());
          list.append(item);
        }
      }
      panel.hidden = false;
      button.setAttribute("aria-expanded", "true");
      button.textContent = "Hide transcript";
    }

    async copy() {
      const text = this.segments.map((segment) => segment.text.trim()).join("\n");
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

  function chosenOptions() {
    const options = [];
    const language = byId("language")?.value.trim();
    if (language) options.push(["language", language]);
    const task = byId("task")?.value;
    if (task && task !== "transcribe") options.push(["task", task]);
    if (byId("word-timestamps").checked) options.push(["word_timestamps", "true"]);
    return options;
  }

  function addFiles(files) {
    const options = chosenOptions();
    for (const file of files) {
      const card = new Card(file, options);
      uploads = uploads.then(() => card.upload());
    }
  }

  // ---- the key's jobs, newest first, paged ----

  async function loadJobs(page) {
    let data;
    try {
      data = await api("GET", `/jobs?limit=${PAGE_SIZE}&offset=${page * PAGE_SIZE}`);
    } catch (error) {
      byId("jobs-error").textContent = error.message;
      return;
    }
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

  byId("key-form").addEventListener("submit", useKey);
  byId("forget-key").addEventListener("click", () => askForKey(""));
  byId("jobs-newer").addEventListener("click", () => loadJobs(Math.max(0, jobsPage - 1)));
  byId("jobs-older").addEventListener("click", () => loadJobs(jobsPage + 1));
  byId("jobs-refresh").addEventListener("click", () => loadJobs(jobsPage));
  wireDropZone();
  if (key()) showApp();
  else askForKey("");
})();
