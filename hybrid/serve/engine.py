"""The one decode loop: a worker thread owns the ``Transformer`` and runs queued jobs in order.

Requests reach it as token ids (``Params``); each becomes a ``Job`` in a FIFO queue.
The worker runs a job's prompt ubatch by ubatch and then its decode steps, sending text
deltas to the job's asyncio queue on the server's event loop; it checks the job's cancel
flag between ubatches and decode steps, so a client that leaves frees the model at the
next step, and a job cancelled while queued is dropped unrun.

Prompt cache (llama-server's ``cache_prompt``): the worker remembers which tokens the KV
cache holds. A new prompt that starts with them rewinds the cache to the common prefix
(``KVCache.rewind``) and runs only the rest. Only positions a prompt computed are
reused: a decode step's experts multiply int8 activations (unless ``--f32``), which a fresh
run of the same text as a prompt ubatch would not do for its well-used experts, so a chat's
previous reply is run again as prompt. A rewind a sliding-window ring cannot make (it overwrote a key the
prefix's end needs) runs the whole prompt.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..model.generate import sample

log = logging.getLogger("hybrid.serve")


@dataclass
class Params:
    prompt: list  # token ids
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple = ()  # stop strings (the tokenizer's stop tokens always stop)


@dataclass
class Result:
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_tokens or the context)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV cache was reused
    t_prompt: float
    t_gen: float


class Busy(Exception):
    """The queue is full."""


class Job:
    """A request in the queue: its ``Params``, a cancel flag, and ``events``, an asyncio queue
    of ``("delta", text)``, then ``("done", Result)`` or ``("error", message)``."""

    def __init__(self, params: Params, loop: asyncio.AbstractEventLoop):
        self.params = params
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self._cancel = threading.Event()

    def cancel(self):
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def send(self, kind: str, value):
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._cancel.set()


class TextStream:
    """Generated ids -> text deltas, as a client should see them: a token that ends inside a
    UTF-8 character waits for the next one, text that may begin a stop string waits until it
    cannot, and a stop string ends the text before it. The deltas joined equal
    ``tok.decode(ids)`` cut at the first stop string."""

    def __init__(self, tok, stops=()):
        self.tok, self.stops = tok, tuple(stops)
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[_prefix:_read] decode to the last text taken
        self.text = ""  # text taken so far (the stop string and after it cut)
        self._sent = 0  # characters of text given out
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        prev = self.tok.decode(self.ids[self._prefix:self._read])
        new = self.tok.decode(self.ids[self._prefix:])
        if new.endswith("\ufffd"):  # inside a character (or bytes that never make one: flush says)
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return self._take(new[len(prev):], final=False)

    def flush(self) -> str:
        """What is held back, at the end of generation."""
        rest = "" if self._read == len(self.ids) else \
            self.tok.decode(self.ids[self._prefix:])[len(self.tok.decode(self.ids[self._prefix:self._read])):]
        self._prefix = self._read = len(self.ids)
        return self._take(rest, final=True)

    def _take(self, delta: str, final: bool) -> str:
        if self.stopped:
            return ""
        self.text += delta
        start = max(0, self._sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            end = len(self.text)
        else:  # hold back a tail that could be the start of a stop string
            hold = 0 if final else max((k for s in self.stops for k in range(1, len(s))
                                        if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        out, self._sent = self.text[self._sent:end], max(self._sent, end)
        return out


class Engine:
    """The worker thread over ``tr`` (a ``Transformer``) and ``tok`` (its ``Tokenizer``).

    ``threads``: Numba threads of the worker (Numba's setting is per thread); ``prompt_cache``
    False turns reuse off (a decode step computes as a one-token prompt ubatch does, so its
    cache position is reused too); ``max_queue`` bounds the waiting jobs.
    """

    def __init__(self, tr, tok, *, threads: int | None = None, prompt_cache: bool = True,
                 max_queue: int = 64):
        self.tr, self.tok = tr, tok
        self.threads, self.prompt_cache = threads, prompt_cache
        self.max_queue = max_queue
        self._queue: queue.Queue = queue.Queue()
        self._kv: list[int] = []  # tokens at cache positions 0.. that a new prompt may reuse
        self._active: Job | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.t_warm = 0.0
        self.counts = dict(requests=0, cancelled=0, failed=0, prompt_tokens=0, cached_tokens=0, generated_tokens=0)
        self._thread = threading.Thread(target=self._work, name="hybrid-decode", daemon=True)

    # -- the server's side -------------------------------------------------------------

    def start(self) -> float:
        """Start the worker and wait for its warm-up (the JIT compile); its seconds."""
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed
        return self.t_warm

    def submit(self, params: Params, loop) -> Job:
        if self._queue.qsize() >= self.max_queue:
            raise Busy(f"{self.max_queue} requests are already waiting")
        job = Job(params, loop)
        self._queue.put(job)
        return job

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self._active is not None

    def close(self, timeout: float = 10.0):
        """Stop after the running job's next step; waiting jobs are dropped."""
        if self._active is not None:
            self._active.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the worker --------------------------------------------------------------------

    def _work(self):
        import numba

        from ..bench import warm_up_model
        try:
            if self.threads:
                numba.set_num_threads(self.threads)
            self.t_warm = warm_up_model(self.tr)
        except BaseException as e:  # given to start(), which raises it in the server's thread
            self._failed = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled:
                continue
            self._active = job
            self.counts["requests"] += 1
            try:
                self._run(job)
            except Exception as e:  # a fault of the model or of this code: this request fails, the server goes on
                log.exception("request failed")
                self.counts["failed"] += 1
                self._kv = []
                self.tr.cache.clear()  # what it holds is unknown now
                job.send("error", f"{type(e).__name__}: {e}")
            finally:
                self._active = None

    def _reuse(self, prompt) -> int:
        """Rewind the cache to the longest prefix of ``prompt`` it holds (at least one prompt
        token runs: its logits start generation); the tokens kept."""
        n = 0
        if self.prompt_cache:
            limit = min(len(self._kv), len(prompt) - 1)
            while n < limit and self._kv[n] == prompt[n]:
                n += 1
        if n and self.tr.cache.rewind(n):
            del self._kv[n:]
            return n
        self.tr.cache.clear()
        self._kv = []
        return 0

    def _run(self, job: Job):
        p, tr = job.params, self.tr
        t0 = time.perf_counter()
        tr.moe.stats.clear()  # (not moe.reset: the experts resident in VRAM stay warm across requests)
        kept = self._reuse(p.prompt)
        self.counts["prompt_tokens"] += len(p.prompt)
        self.counts["cached_tokens"] += kept
        rest = np.asarray(p.prompt[kept:], np.int64)
        logits = None
        for s, e in tr.ubatch_bounds(len(rest)):
            if job.cancelled:
                self.counts["cancelled"] += 1
                return
            logits = tr.eval(rest[s:e], logits="last")
            self._kv.extend(int(t) for t in rest[s:e])
        t_prompt = time.perf_counter() - t0
        rng = np.random.default_rng(p.seed)
        text = TextStream(self.tok, p.stop)
        last, n, finish = logits[-1], 0, "length"
        t0 = time.perf_counter()
        while n < p.max_tokens:
            token = sample(last, p.temperature, p.top_p, rng)
            if token in self.tok.stop:
                finish = "stop"
                break
            n += 1
            self.counts["generated_tokens"] += 1
            delta = text.push(token)
            if delta:
                job.send("delta", delta)
            if text.stopped:
                finish = "stop"
                break
            if n >= p.max_tokens or tr.n_past >= tr.n_ctx or job.cancelled:
                break
            last = tr.decode_one_token(token)
            if len(self._kv) == tr.n_past - 1:
                self._kv.append(token)
        if job.cancelled:
            self.counts["cancelled"] += 1
            log.info("cancelled after %d tokens (the client left)", n)
            return
        delta = text.flush()
        if delta:
            job.send("delta", delta)
        t_gen = time.perf_counter() - t0
        job.send("done", Result(finish, len(p.prompt), n, kept, t_prompt, t_gen))
        log.info("prompt %d tokens (%d from the cache) %.3f s; %d tokens %.3f s (%.1f t/s), %s",
                 len(p.prompt), kept, t_prompt, n, t_gen, (n - 1) / t_gen if n > 1 and t_gen else 0.0, finish)
