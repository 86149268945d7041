// Live transcription from the microphone (ARCHITECTURE.md, "The web page"): the microphone, its
// samples (pcm-worklet.js) and the socket to /ws/transcribe. It knows nothing of the page's markup:
// page.js shows what it reports. Loaded before page.js, which finds it as window.WhisperLive.
"use strict";

window.WhisperLive = (() => {
  const SUBPROTOCOL = "whisper-flask";
  const RATE = 16000;
  // How long Stop waits for the server's last text before giving up on it.
  const END_WAIT_MS = 60_000;

  // The microphone's sound as it is: Whisper hears speech best unprocessed, and the browser's gain
  // control lifts loud speech to a level the service refuses as noise (a mean of 0.39 of full scale in
  // Chromium, measured, against the service's 0.35: service/live.py, NOISE_LEVEL).
  const SOUND = { autoGainControl: false, noiseSuppression: false, echoCancellation: false };

  class LiveFailure extends Error {}

  function microphoneFailure(error) {
    if (error.name === "NotAllowedError" || error.name === "SecurityError") {
      return "The microphone was not allowed. Allow it for this site in the browser's settings, then press Record again.";
    }
    if (error.name === "NotFoundError" || error.name === "OverconstrainedError") {
      return "No microphone was found. Connect one, then press Record again.";
    }
    if (error.name === "NotReadableError") {
      return "The microphone could not be opened: another program may be using it.";
    }
    return `The microphone could not be used: ${error.message || error.name}.`;
  }

  function socketUrl(root, query) {
    // Same origin as the page, so the CSP's connect-src 'self' allows it; the token is never in the URL.
    const url = new URL(`${root}/ws/transcribe`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    for (const [name, value] of query) url.searchParams.set(name, value);
    return url.href;
  }

  // One recording: start() opens the microphone and the socket, stop() ends it. What happens is reported
  // through `events`: state(words), partial(message), final(message), then either ended(the server's end
  // message, with the saved job) or failed(words), once.
  class LiveRecording {
    constructor({ root, workletUrl, query, token, events }) {
      this.root = root;
      this.workletUrl = workletUrl;
      this.query = query;
      this.token = token; // async () => a live token: the key itself never goes on a socket
      this.events = events;
      this.outbox = []; // what is said before the socket opens: the first words are not lost while it connects
      this.over = false;
      this.seconds = 0; // of sound sent, or kept to send
    }

    // Resolves once the microphone is heard (its sound is kept until the socket opens); LiveFailure if
    // the microphone or a token cannot be had. Closed meanwhile (a forgotten key), it releases all.
    async start() {
      if (!navigator.mediaDevices?.getUserMedia || !window.AudioWorkletNode) {
        throw new LiveFailure(
          window.isSecureContext
            ? "This browser cannot record here: use a recent Chrome, Edge, Firefox or Safari."
            : "Recording needs a secure connection: open this page over HTTPS.",
        );
      }
      try {
        // Made before any wait, while the click still counts: a context made later may start suspended.
        this.context = new AudioContext({ sampleRate: RATE });
        try {
          this.stream = await navigator.mediaDevices.getUserMedia({ audio: SOUND });
        } catch (error) {
          throw new LiveFailure(microphoneFailure(error));
        }
        if (this.over) return this.release();
        await this.listen();
        if (this.over) return this.release();
        this.events.state("Connecting");
        const token = await this.token();
        if (this.over) return this.release();
        this.connect(token);
      } catch (error) {
        this.over = true;
        this.release();
        throw error instanceof LiveFailure ? error : new LiveFailure(error.message);
      }
    }

    async listen() {
      let source;
      try {
        source = this.context.createMediaStreamSource(this.stream);
      } catch {
        // Firefox takes a microphone only at its own rate: the worklet resamples instead.
        this.context.close();
        this.context = new AudioContext();
        source = this.context.createMediaStreamSource(this.stream);
      }
      await this.context.audioWorklet.addModule(this.workletUrl);
      this.node = new AudioWorkletNode(this.context, "pcm-frames", {
        channelCount: 1,
        channelCountMode: "explicit", // a stereo microphone is mixed down by the graph
      });
      this.node.port.onmessage = (event) => {
        if (event.data === "flushed") this.flushed?.();
        else this.send(event.data);
      };
      source.connect(this.node);
      // Its output is silence; connected so that the graph runs it (a node nothing pulls may not be processed).
      this.node.connect(this.context.destination);
      await this.context.resume();
    }

    connect(token) {
      const socket = new WebSocket(socketUrl(this.root, this.query), [SUBPROTOCOL, `token.${token}`]);
      this.socket = socket;
      socket.addEventListener("open", () => {
        if (this.over) return;
        this.open = true;
        this.events.state(this.stopping ? "Finishing the transcript" : "Recording");
        for (const item of this.outbox) socket.send(item);
        this.outbox = [];
      });
      socket.addEventListener("message", (event) => this.receive(event.data));
      socket.addEventListener("close", () => {
        // A browser tells nothing of a refused handshake (no status, no body): only that it never opened.
        this.fail(
          this.open
            ? "The connection to the server was lost before the transcript was finished."
            : "The live session could not start: the server may be busy with other live sessions, or out of " +
                "reach. Try again in a moment.",
        );
      });
    }

    receive(data) {
      if (this.over) return;
      let message;
      try {
        message = JSON.parse(data);
      } catch {
        return; // not this protocol's: nothing to show
      }
      if (message.type === "partial") this.events.partial(message);
      else if (message.type === "final") this.events.final(message);
      else if (message.type === "error") this.fail(`Live transcription stopped: ${message.error}`);
      else if (message.type === "end") this.end(() => this.events.ended(message));
    }

    send(item) {
      if (this.over) return;
      if (item instanceof ArrayBuffer) this.seconds += item.byteLength / 2 / RATE;
      if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(item);
      else this.outbox.push(item);
    }

    async stop() {
      if (this.over || this.stopping) return;
      this.stopping = true;
      // The samples of the last moment are still in the worklet: they go out before "end".
      const flushed = new Promise((resolve) => {
        this.flushed = resolve;
      });
      this.node.port.postMessage("flush");
      await Promise.race([flushed, new Promise((resolve) => setTimeout(resolve, 500))]);
      this.stopMicrophone();
      this.send(JSON.stringify({ type: "end" }));
      if (this.open) this.events.state("Finishing the transcript");
      this.endTimer = setTimeout(() => this.fail("The server did not finish the transcript in time."), END_WAIT_MS);
    }

    fail(words) {
      this.end(() => this.events.failed(words));
    }

    // Leave at once, as when the key is forgotten: nothing more is sent, heard or reported.
    close() {
      this.end(() => {});
    }

    end(report) {
      if (this.over) return;
      this.over = true;
      clearTimeout(this.endTimer);
      this.release();
      report();
    }

    stopMicrophone() {
      for (const track of this.stream?.getTracks() ?? []) track.stop(); // the browser's recording sign goes out
      this.node?.disconnect();
    }

    release() {
      this.stopMicrophone();
      this.context?.close().catch(() => {});
      this.context = null;
      if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close();
    }
  }

  return { LiveRecording, LiveFailure };
})();
