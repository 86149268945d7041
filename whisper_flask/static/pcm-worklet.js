// The microphone's samples as /ws/transcribe takes them (ARCHITECTURE.md, "The web page"): 16 kHz
// 16-bit little-endian mono PCM, posted to the page in frames of about 100 ms. Loaded by live.js into an
// AudioWorklet, where it runs on the audio thread: the page's own work cannot make it drop samples.
"use strict";

const RATE = 16000;
const FRAME_SAMPLES = RATE / 10;

class PcmFrames extends AudioWorkletProcessor {
  constructor() {
    super();
    // Chromium resamples the microphone to the context's 16 kHz; a browser that cannot (Firefox refuses
    // a 16 kHz context for a microphone of another rate) runs the context at its own rate, resampled
    // here by linear interpolation: coarse, but Whisper hears speech through it well.
    this.step = sampleRate / RATE;
    this.position = 0; // where the next output sample falls, in input samples after `previous`
    this.previous = 0;
    this.frame = new DataView(new ArrayBuffer(FRAME_SAMPLES * 2));
    this.filled = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        this.post();
        this.port.postMessage("flushed"); // after the last frame, on the same port: nothing is left behind
      }
    };
  }

  process(inputs) {
    const input = inputs[0][0]; // the node mixes the microphone down to one channel
    if (input) {
      if (this.step === 1) {
        for (let i = 0; i < input.length; i++) this.push(input[i]);
      } else {
        let at = this.position;
        for (; at < input.length; at += this.step) {
          const index = Math.floor(at);
          const before = index === 0 ? this.previous : input[index - 1];
          const fraction = at - index;
          this.push(before + (input[index] - before) * fraction);
        }
        this.position = at - input.length;
        this.previous = input[input.length - 1];
      }
    }
    return true; // kept alive until the page disconnects it
  }

  push(sample) {
    const clipped = Math.max(-1, Math.min(1, sample));
    this.frame.setInt16(this.filled * 2, Math.round(clipped * 32767), true); // little-endian, whatever the CPU
    this.filled += 1;
    if (this.filled === FRAME_SAMPLES) this.post();
  }

  post() {
    if (!this.filled) return;
    const bytes = this.frame.buffer.slice(0, this.filled * 2);
    this.port.postMessage(bytes, [bytes]);
    this.filled = 0;
  }
}

registerProcessor("pcm-frames", PcmFrames);
