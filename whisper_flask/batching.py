"""Decoding the windows of concurrent jobs together, one decoder step at a time.

Each window is decoded by Whisper's own DecodingTask (logit filters, greedy, sampling and beam
decoders, ranking), run in its job's thread. Only the task's Inference, the kv-cached forward pass,
is replaced: it hands the window's new tokens to the model thread and waits. That thread runs
the forward pass of every window waiting as one step. The Linear layers, most of the work, run on
all their tokens at once; attention runs per window, on the window's own cache, positions and
prompt, exactly as when it is alone. A window joins at the first step after it arrives and leaves
when its task ends, so no window waits for a longer one to finish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
import whisper
from torch import Tensor
from whisper.decoding import BeamSearchDecoder, DecodingOptions, DecodingResult, DecodingTask, GreedyDecoder, Inference

log = logging.getLogger(__name__)
T = TypeVar("T")

#: torch's own intra-op thread count, read before the job threads set theirs to one: each thread
#: that starts later inherits the last count set, and the model thread must keep the full one.
MODEL_THREADS = torch.get_num_threads()


def use_torch_threads(count: int) -> None:
    """Set the calling thread's torch intra-op threads, for good."""
    # torch initialises a thread's count at its first parallel op, to the last count set by any
    # thread; get_num_threads() runs that initialisation now, so it cannot undo this setting.
    torch.get_num_threads()
    torch.set_num_threads(count)


#: Hidden states -> vocabulary logits (the transposed token embedding, in fp32 or int8).
Projection = Callable[[Tensor], Tensor]


def whisper_projection(model: whisper.Whisper) -> Projection:
    """The logits projection exactly as Whisper's TextDecoder computes it."""
    weight = model.decoder.token_embedding.weight

    def project(x: Tensor) -> Tensor:
        return (x @ torch.transpose(weight.to(x.dtype), 0, 1)).float()

    return project


@dataclass(eq=False)
class _Work:
    """Model work a thread waits for: a window's next forward pass, or a call such as the encoder."""

    window: _WindowInference | None = None  # a decoder step of this window, with `tokens`
    tokens: Tensor | None = None  # the window's new tokens, (rows, tokens)
    call: Callable[[], Any] | None = None  # any other use of the model
    owner: int = field(default_factory=threading.get_ident)
    arrived: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None  # what it returned, or the exception it raised


class ModelThread:
    """The one thread that runs the shared model: every window's decoder steps batched, calls in turn.

    torch's OpenMP runtime shortens its spin-waits once it manages more threads than there are
    cores, and every thread that runs a parallel op keeps a team: with the job threads' teams,
    each small op of a decoder step took twice as long (measured). Model work therefore runs
    here only, and the job threads, which only filter logits, run torch on one thread.
    """

    def __init__(self, size: int, wait_s: float) -> None:
        self._size = size
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._queue: list[_Work] = []
        self._decoding = 0  # windows admitted to the steps and not yet finished
        self._busy = False  # running work (set and cleared under the lock)
        self._reserved: deque[int] = deque()  # threads owning, then waiting for, the model alone
        self._model: whisper.Whisper
        self._project: Projection

    def start(self, model: whisper.Whisper, project: Projection) -> None:
        """Start the thread (a daemon: it only ever waits for or runs model work)."""
        self._model, self._project = model, project
        threading.Thread(target=self._run, name="whisper-model", daemon=True).start()

    def run(self, call: Callable[[], T]) -> T:
        """Run `call` (which uses the model) on the model thread and return what it returns."""
        return self._submit(_Work(call=call))

    @torch.no_grad()
    def decode(self, features: Tensor, options: DecodingOptions, seed: int) -> DecodingResult:
        """Decode one encoded window with Whisper's DecodingTask; sampling is seeded by `seed`."""
        task = DecodingTask(self._model, options)
        task.inference = _WindowInference(self, self._model.decoder, task.sot_index)
        if isinstance(task.decoder, BeamSearchDecoder):
            task.decoder.inference = task.inference  # it kept a reference to the one replaced
        elif options.temperature > 0:
            task.decoder = _SeededSampler(options.temperature, task.tokenizer.eot, seed)
        return task.run(features)[0]

    def reserve(self) -> None:
        """Have the model to this thread alone (first come, first served) until release().

        Word alignment hooks shared modules and flips a global attention switch before its
        forward pass; nothing else may run on the model meanwhile.
        """
        me = threading.get_ident()
        with self._cond:
            if me in self._reserved:
                return
            self._reserved.append(me)
            self._cond.wait_for(lambda: self._reserved[0] == me and not self._busy)

    def release(self) -> None:
        """End this thread's reservation, if it has one."""
        with self._cond:
            if threading.get_ident() in self._reserved:
                self._reserved.remove(threading.get_ident())
                self._cond.notify_all()

    def _submit(self, work: _Work) -> Any:
        with self._cond:
            self._queue.append(work)
            self._cond.notify_all()
        work.done.wait()
        if isinstance(work.result, BaseException):
            raise work.result
        return work.result

    def _leave(self, window: _WindowInference) -> None:
        """A window's task ended; steps stop waiting for it."""
        with self._cond:
            if window.admitted:
                window.admitted = False
                self._decoding -= 1
                self._cond.notify_all()

    def _take(self) -> list[_Work]:
        """The next call (first: a window it encodes then joins the steps sooner), or the next step."""
        while True:
            if self._reserved:
                # Only the reserving thread's calls, once nothing else runs.
                owner = self._reserved[0]
                calls = [work for work in self._queue if work.owner == owner and work.call is not None]
                if calls:
                    return calls[:1]
                self._cond.wait()
                continue
            calls = [work for work in self._queue if work.call is not None]
            if calls:
                return calls[:1]
            steps = [work for work in self._queue if work.window and work.window.admitted]
            joining = [work for work in self._queue if work.window and not work.window.admitted]
            joining = joining[: self._size - self._decoding]
            # Every admitted window sends its next tokens within a millisecond of the last step;
            # waiting for all of them keeps the steps full. The wait is bounded, so a job thread
            # the OS has put aside holds nobody up for long.
            batch = steps + joining
            if not batch:  # nothing to run until a window leaves or work arrives
                self._cond.wait()
                continue
            left = min(work.arrived for work in batch) + self._wait_s - time.monotonic()
            if len(steps) >= self._decoding or left <= 0:
                for work in joining:
                    assert work.window is not None
                    work.window.admitted = True
                self._decoding += len(joining)
                return batch
            self._cond.wait(left)

    def _run(self) -> None:
        use_torch_threads(MODEL_THREADS)  # see the class docstring
        while True:
            with self._cond:
                batch = self._take()
                self._queue = [work for work in self._queue if work not in batch]
                self._busy = True
            try:
                if batch[0].call is not None:
                    with torch.no_grad():
                        results: list[Any] = [batch[0].call()]
                else:
                    results = self._step(batch)
            except Exception as exc:  # the threads waiting on this work fail with it; the thread goes on
                log.exception("model work for %d window(s) failed", len(batch))
                results = [exc] * len(batch)
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            for work, result in zip(batch, results, strict=True):
                work.result = result
                work.done.set()

    @torch.no_grad()
    def _step(self, batch: list[_Work]) -> list[Tensor]:
        """One decoder forward pass over the new tokens of every window in `batch`."""
        decoder = self._model.decoder
        windows = [work.window for work in batch if work.window is not None]
        tokens = [work.tokens for work in batch if work.tokens is not None]
        # All new tokens of all windows as the rows of one matrix, for the Linear layers.
        x = torch.cat(
            [
                (
                    decoder.token_embedding(new)
                    + decoder.positional_embedding[window.length : window.length + new.shape[1]]
                ).flatten(end_dim=1)
                for new, window in zip(tokens, windows, strict=True)
            ]
        ).to(windows[0].dtype)
        sizes = [new.numel() for new in tokens]
        for index, block in enumerate(decoder.blocks):
            h = block.attn_ln(x)
            queries, keys, values = (
                layer(h).split(sizes) for layer in (block.attn.query, block.attn.key, block.attn.value)
            )
            x = x + block.attn.out(
                torch.cat([w.attend(index, q, k, v) for w, q, k, v in zip(windows, queries, keys, values, strict=True)])
            )
            queries = block.cross_attn.query(block.cross_attn_ln(x)).split(sizes)
            x = x + block.cross_attn.out(
                torch.cat([w.attend_audio(index, q) for w, q in zip(windows, queries, strict=True)])
            )
            x = x + block.mlp(block.mlp_ln(x))
        hidden = decoder.ln(x).split(sizes)
        wanted = [w.read_positions(h) for w, h in zip(windows, hidden, strict=True)]
        logits = self._project(torch.cat(wanted)).split([len(rows) for rows in wanted])
        for window, new in zip(windows, tokens, strict=True):
            window.length += new.shape[1]
            window.widest = max(window.widest, len(batch))
        return [w.logits_at_read_positions(rows) for w, rows in zip(windows, logits, strict=True)]


class _WindowInference(Inference):
    """One window's kv-cache, its forward passes run by the model thread among other windows'."""

    def __init__(self, thread: ModelThread, decoder: whisper.model.TextDecoder, sot_index: int) -> None:
        self._thread = thread
        self._decoder = decoder
        self._sot_index = sot_index
        self.admitted = False  # taking part in the steps (set and cleared under the model thread's lock)
        self.length = 0  # tokens in the cache
        self.widest = 0  # most windows that shared one of its steps
        self.dtype = torch.float32
        self._rows = 0
        self._new = 0  # tokens per row in the pass being run
        self._read: list[int] = []  # the positions of those whose logits DecodingTask reads
        self._audio: Tensor | None = None
        self._self_kv: list[tuple[Tensor, Tensor]] = []
        self._cross_kv: list[tuple[Tensor, Tensor]] = []

    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        """Logits for the tokens not yet in the cache (all of them on the first call)."""
        if self._audio is None:
            # One window per task; best-of and beam rows all read the same audio.
            self._audio, self.dtype = audio_features[:1], audio_features.dtype
        self._rows, self._new = tokens.shape[0], tokens.shape[1] - self.length
        self._read = [0] if self._new == 1 else sorted({self._sot_index, self._new - 1})  # see read_positions
        return self._thread._submit(_Work(window=self, tokens=tokens[:, self.length :]))

    def attend(self, index: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Self-attention of the new tokens over this window's cache, which they join."""
        n_head = self._decoder.blocks[index].attn.n_head
        key, value = _keys(self._rowwise(k), n_head), _heads(self._rowwise(v), n_head)
        if index < len(self._self_kv):
            previous_key, previous_value = self._self_kv[index]
            key, value = torch.cat([previous_key, key], dim=3), torch.cat([previous_value, value], dim=2)
            self._self_kv[index] = (key, value)
        else:
            self._self_kv.append((key, value))
        mask = None
        if self._new > 1:  # a prompt: each token sees the ones before it only (Whisper's causal mask)
            mask = self._decoder.mask[self.length : self.length + self._new, : self.length + self._new]
        return _attention(self._rowwise(q), key, value, n_head, mask).flatten(end_dim=1)

    def attend_audio(self, index: int, q: Tensor) -> Tensor:
        """Cross-attention of the new tokens over the window's audio."""
        cross = self._decoder.blocks[index].cross_attn
        if index == len(self._cross_kv):
            assert self._audio is not None
            self._cross_kv.append(
                (_keys(cross.key(self._audio), cross.n_head), _heads(cross.value(self._audio), cross.n_head))
            )
        key, value = self._cross_kv[index]
        # Every row reads the same audio: the rows' queries form one matrix against one cache.
        return _attention(q[None], key, value, cross.n_head)[0]

    def read_positions(self, hidden: Tensor) -> Tensor:
        """The hidden states DecodingTask reads logits of: the last token's, and the sot's on a prompt."""
        if self._new == 1:
            return hidden
        return self._rowwise(hidden)[:, self._read].flatten(end_dim=1)

    def logits_at_read_positions(self, logits: Tensor) -> Tensor:
        """(rows, new tokens, vocabulary) logits, set where DecodingTask reads them.

        On a prompt, DecodingTask reads the sot's logits (no-speech probability) and the last
        token's; projecting the other positions to the vocabulary would cost more than the
        decoder's layers, so they are left unset.
        """
        if self._new == 1:
            return logits[:, None]
        full = logits.new_empty(self._rows, self._new, logits.shape[-1])
        full[:, self._read] = logits.view(self._rows, len(self._read), -1)
        return full

    def _rowwise(self, x: Tensor) -> Tensor:
        return x.view(self._rows, -1, x.shape[-1])

    def rearrange_kv_cache(self, source_indices: list[int]) -> None:
        """Follow beam search's reordering of the rows (the audio is the same for all)."""
        if source_indices != list(range(len(source_indices))):
            self._self_kv = [(key[source_indices], value[source_indices]) for key, value in self._self_kv]

    def cleanup_caching(self) -> None:
        """Drop the caches and leave the steps (run() calls this when its loop ends)."""
        self._thread._leave(self)
        if self.widest:
            log.debug("decoded a window of %d tokens, up to %d windows per step", self.length, self.widest)
        self._self_kv, self._cross_kv, self._audio = [], [], None


class _SeededSampler(GreedyDecoder):
    """Whisper's sampling decoder drawing from the window's own generator.

    Job threads sample at the same time, so torch's global generator would make a window's
    samples depend on its neighbours; its own, seeded by the window, does not.
    """

    def __init__(self, temperature: float, eot: int, seed: int) -> None:
        super().__init__(temperature, eot)
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, tokens: Tensor, logits: Tensor, sum_logprobs: Tensor) -> tuple[Tensor, bool]:
        """GreedyDecoder.update with the sampling drawn from this window's generator."""
        probs = F.softmax(logits.float() / self.temperature, dim=-1)
        next_tokens = torch.multinomial(probs, 1, generator=self._generator)[:, 0]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        current_logprobs = logprobs[torch.arange(logprobs.shape[0]), next_tokens]
        sum_logprobs += current_logprobs * (tokens[:, -1] != self.eot)
        next_tokens[tokens[:, -1] == self.eot] = self.eot
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        return tokens, bool((tokens[:, -1] == self.eot).all())


def _heads(x: Tensor, n_head: int) -> Tensor:
    """(rows, tokens, state) -> (rows, heads, tokens, state/heads), contiguous for the matmuls."""
    return x.view(*x.shape[:2], n_head, -1).permute(0, 2, 1, 3).contiguous()


def _keys(x: Tensor, n_head: int) -> Tensor:
    """Keys as (rows, heads, state/heads, tokens), scaled as Whisper scales them."""
    return (x.view(*x.shape[:2], n_head, -1).permute(0, 2, 3, 1) * (x.shape[-1] // n_head) ** -0.25).contiguous()


def _attention(q: Tensor, keys: Tensor, v: Tensor, n_head: int, mask: Tensor | None = None) -> Tensor:
    """MultiHeadAttention.qkv_attention's non-SDPA branch on cached, pre-scaled heads.

    Not SDPA: with one query per row (every step after the first) torch's CPU flash-attention
    kernel spent 20x the arithmetic's time (measured: 54 % of a batch's decoding).
    """
    qk = (q.view(*q.shape[:2], n_head, -1).permute(0, 2, 1, 3) * (q.shape[-1] // n_head) ** -0.25) @ keys
    if mask is not None:
        qk = qk + mask
    w = F.softmax(qk.float(), dim=-1).to(q.dtype)
    return (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2)
