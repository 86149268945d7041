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

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import whisper
from torch import Tensor
from whisper.decoding import BeamSearchDecoder, DecodingOptions, DecodingResult, DecodingTask, LogitFilter
from whisper.model import TextDecoder

from whisper_flask.engine.decoding import SeededSampler, WindowInference
from whisper_flask.engine.drafts import drafted_main_loop
from whisper_flask.exceptions import ShuttingDown

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


def whisper_projection(decoder: TextDecoder) -> Projection:
    """The logits projection as Whisper's TextDecoder computes it, on a transposed copy of the token embedding."""
    # Whisper multiplies by the embedding's transposed view, which BLAS repacks at every call: base's 106 MB
    # weight, at every decoder step. A contiguous transposed copy (its size again in memory) took base's fp32
    # projection from 11.4 to 4.9 ms at 1 row and from 36.8 to 20.0 ms at 3 (AMD EPYC, 2 threads).
    weight_t = decoder.token_embedding.weight.detach().t().contiguous()

    def project(x: Tensor) -> Tensor:
        return (x @ weight_t.to(x.dtype)).float()

    return project


@dataclass(eq=False)
class _Work:
    """Model work a thread waits for: a window's next forward pass, or a call such as the encoder."""

    window: WindowInference | None = None  # a decoder step of this window, with `tokens`
    tokens: Tensor | None = None  # the window's new tokens, (rows, tokens)
    call: Callable[[], Any] | None = None  # any other use of the model
    background: bool = False  # a call that lets a decoder step run between two of its kind (diarization)
    urgent: bool = False  # a live session's call: before every other call
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
        self._live: dict[WindowInference, float] = {}  # of which live sessions' windows, with when each was admitted
        self._busy = False  # running work (set and cleared under the lock)
        self._background_ran = False  # the last work run was a background call
        self._reserved: deque[int] = deque()  # threads owning, then waiting for, the model alone
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._model: whisper.Whisper
        self._project: Projection

    def start(self, model: whisper.Whisper, project: Projection) -> None:
        """Start the thread; it runs model work until stop()."""
        self._model, self._project = model, project
        self._thread = threading.Thread(target=self._run, name="whisper-model", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Fail the work still queued with ShuttingDown, end the thread and wait for it."""
        with self._cond:
            self._stopped = True
            refused, self._queue = self._queue, []
            self._cond.notify_all()
        for work in refused:
            work.result = ShuttingDown("the model is stopping")
            work.done.set()
        if self._thread is not None:
            self._thread.join()

    def run(self, call: Callable[[], T], *, background: bool = False, urgent: bool = False) -> T:
        """Run `call` (which uses the model) on the model thread and return what it returns.

        Calls run before decoder steps, `urgent` ones (a live session's) first, and others only while no live
        window decodes; an urgent call waits, too, for the live windows that were decoding when it came; a
        `background` call, after another background call, only once the windows decoding have had a step: a long
        run of them takes at most every other turn.
        """
        return self._submit(_Work(call=call, background=background, urgent=urgent))

    @torch.no_grad()
    def decode(
        self,
        features: Tensor,
        options: DecodingOptions,
        seed: int,
        check: Callable[[], None] = lambda: None,
        *,
        urgent: bool = False,
        logit_filter: LogitFilter | None = None,
        draft: Sequence[int] = (),
    ) -> DecodingResult:
        """Decode one encoded window with Whisper's DecodingTask (seeded by `seed`); `check` may stop it at a step.

        An `urgent` window (a live session's) joins the steps at once, even past the batch's size;
        `logit_filter` runs after Whisper's own; a greedy decode checks `draft`, the tokens it expects, in its
        first pass (drafts.py).
        """
        task = DecodingTask(self._model, options)
        if logit_filter is not None:
            task.logit_filters.append(logit_filter)
        if draft:
            assert options.temperature == 0 and options.beam_size is None, "a draft is for greedy decoding"
            task._main_loop = functools.partial(drafted_main_loop, task, draft)
        # The window is encoded already, perhaps from fewer than 30 s (a live buffer, live_window.py): the
        # task would encode anything not shaped as a whole window once more.
        task._get_audio_features = lambda mel: mel
        task.inference = WindowInference(self, self._model.decoder, task.sot_index, check, urgent=urgent)
        if isinstance(task.decoder, BeamSearchDecoder):
            task.decoder.inference = task.inference  # it kept a reference to the one replaced
        elif options.temperature > 0:
            task.decoder = SeededSampler(options.temperature, task.tokenizer.eot, seed)
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

    def step(self, window: WindowInference, tokens: Tensor) -> Tensor:
        """Run the window's next forward pass over `tokens` in the next decoder step; its logits."""
        result: Tensor = self._submit(_Work(window=window, tokens=tokens))
        return result

    def _submit(self, work: _Work) -> Any:
        with self._cond:
            if self._stopped:
                raise ShuttingDown("the model is stopping")
            self._queue.append(work)
            self._cond.notify_all()
        work.done.wait()
        if isinstance(work.result, BaseException):
            raise work.result
        return work.result

    def leave(self, window: WindowInference) -> None:
        """A window's task ended; steps stop waiting for it."""
        with self._cond:
            if window.admitted:
                window.admitted = False
                self._decoding -= 1
                self._live.pop(window, None)
                self._cond.notify_all()

    def _take(self) -> list[_Work]:
        """The next call (first: a window it encodes then joins the steps sooner), the next step, or [] to stop."""
        while not self._stopped:
            if self._reserved:
                # Only the reserving thread's calls, once nothing else runs.
                owner = self._reserved[0]
                calls = [work for work in self._queue if work.owner == owner and work.call is not None]
                if calls:
                    return calls[:1]
                self._cond.wait()
                continue
            calls = sorted((work for work in self._queue if work.call is not None), key=lambda work: not work.urgent)
            if self._live:
                # A live decode, once started, ends before a file job's encoder pass (0.35-0.62 s) runs, and before
                # the encoder passes of sessions that asked after it started: else, with sessions enough to keep the
                # model busy, the others' passes come between every two of its steps, and a long decode takes many
                # seconds. 4 sessions and a file job (bench/live.py's crowded step, base, AVX2-only AMD EPYC; the
                # runs in README, Performance): decodes' p90 from 2.0-3.3 s to 1.7-1.9 s; partial p90 5.2 s before,
                # 4.1 s after, final p90 8.4 and 6.5 s (means of 4 runs each).
                since = min(self._live.values())
                calls = [work for work in calls if work.urgent and work.arrived < since]
            if self._background_ran and self._decoding:
                calls = [work for work in calls if not work.background]
            if calls:
                self._background_ran = calls[0].background
                return calls[:1]
            steps = [work for work in self._queue if work.window and work.window.admitted]
            joining = [work for work in self._queue if work.window and not work.window.admitted]
            expected = self._decoding
            # A live session's window never waits for a place, and while any decodes the steps are theirs
            # alone: their text is due within seconds, and the sessions are bounded (MAX_LIVE_SESSIONS). File
            # jobs' windows take the places and the steps left.
            urgent = [work for work in joining if work.window and work.window.urgent]
            if urgent or self._live:
                steps = [work for work in steps if work.window and work.window.urgent]
                joining, expected = urgent, len(self._live)
            else:
                joining = joining[: max(0, self._size - self._decoding)]
            # Every admitted window sends its next tokens within a millisecond of the last step;
            # waiting for all of them keeps the steps full. The wait is bounded, so a job thread
            # the OS has put aside holds nobody up for long.
            batch = steps + joining
            if not batch:  # nothing to run until a window leaves or work arrives
                self._cond.wait()
                continue
            left = min(work.arrived for work in batch) + self._wait_s - time.monotonic()
            if len(steps) >= expected or left <= 0:
                for work in joining:
                    assert work.window is not None
                    work.window.admitted = True
                    if work.window.urgent:
                        self._live[work.window] = time.monotonic()
                self._decoding += len(joining)
                self._background_ran = False
                return batch
            self._cond.wait(left)
        return []

    def _run(self) -> None:
        use_torch_threads(MODEL_THREADS)  # see the class docstring
        with torch.no_grad():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cond:
                batch = self._take()
                if not batch:
                    return
                self._queue = [work for work in self._queue if work not in batch]
                self._busy = True
            try:
                results: list[Any] = [batch[0].call()] if batch[0].call is not None else self._step(batch)
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
