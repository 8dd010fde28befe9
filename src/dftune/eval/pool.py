"""Worker processes for the grader: bounded time and memory per task, and a clear error
when they cannot start.

A task is a module-level function ``fn(payload, timeout) -> result`` named
``"module:function"`` (so a spawned worker can import it). Each worker imports
math-verify and the paper grader's parsers once, says it is ready, then runs tasks one at a time; idle workers are kept
for the next call (a Python process with sympy takes seconds to start), and stopped at
exit or by ``close_pools``. A task that outlives
its hard deadline has its worker killed and replaced; a worker that dies mid-task is
replaced; either way the task gets ``fallback(payload, status)`` ("timeout", "crash",
"memory"), computed in the parent without math-verify. A worker that dies before it
is ready, or none ready within ``START_TIMEOUT`` seconds, is one ``GraderStartError``
at once (never minutes of respawning).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import multiprocessing as mp
import os
import time
from multiprocessing.connection import wait

from dftune.errors import UserError

START_TIMEOUT = 120.0


class GraderStartError(UserError, RuntimeError):
    """The grader's worker processes could not start."""


def _resolve(name: str):
    module, _, fn = name.partition(":")
    return getattr(importlib.import_module(module), fn)


def _worker(conn, memory_mb: int, timeout: int) -> None:
    if memory_mb:
        import resource

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # math-verify logs every timeout; they are counted in the verdicts' status instead
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    import math_verify  # noqa: F401  (import once, before the first task)

    from dftune.eval.paper_equal import warm

    warm()  # the paper grader's sympy grammar too: a task's time limit never pays for imports

    conn.send(("ready", None, ""))
    fns = {}
    while True:
        task = conn.recv()
        if task is None:
            return
        idx, fn_name, payload = task
        try:
            fn = fns.get(fn_name) or fns.setdefault(fn_name, _resolve(fn_name))
            conn.send((idx, fn(payload, timeout), ""))
        except MemoryError:
            conn.send((idx, None, "memory"))


class _Worker:
    def __init__(self, memory_mb: int, timeout: int):
        ctx = mp.get_context("spawn")  # never fork a process that may hold vLLM or CUDA threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, memory_mb, timeout), daemon=True)
        self.proc.start()
        child.close()
        self.born = time.monotonic()
        self.task = None  # (idx, started_at) while busy
        self.ready = False
        self.group = None  # the group of tasks it is working through

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=1)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def _start_error(w: _Worker, memory_mb: int) -> GraderStartError:
    w.proc.join(timeout=5)
    return GraderStartError(
        f"a grader worker (pid {w.proc.pid}) exited with code {w.proc.exitcode} before it was ready. "
        f"Likely causes: memory_mb={memory_mb} is too low for Python + sympy (use 4096, or 0 for no limit); "
        "math-verify is not installed; or grading is started while a script's __main__ module is being "
        "imported (workers are spawned and re-import it): put the call under `if __name__ == \"__main__\":`."
    )


_POOLS: dict[tuple[int, int], list[_Worker]] = {}  # idle workers by (memory_mb, timeout)


def close_pools() -> None:
    """Stop every idle worker."""
    for pool in _POOLS.values():
        for w in pool:
            w.stop()
    _POOLS.clear()


atexit.register(close_pools)


class _Queue:
    """Pending task indices by group; a worker keeps taking from its group while it lasts
    (the samples of one problem go to one worker, whose caches then hold its gold and
    answers), then takes the next group no other worker is on."""

    def __init__(self, groups: list):
        self.pending: dict = {}
        for i, g in enumerate(groups):
            self.pending.setdefault(g, []).append(i)
        for idx in self.pending.values():
            idx.reverse()

    def __bool__(self) -> bool:
        return bool(self.pending)

    def take(self, w, busy_groups: set) -> int:
        if w.group not in self.pending:
            w.group = next((g for g in self.pending if g not in busy_groups), next(iter(self.pending)))
        idx = self.pending[w.group]
        i = idx.pop()
        if not idx:
            del self.pending[w.group]
        return i


def run_tasks(fn: str, payloads: list, *, fallback: str, workers: int = 0, timeout: int = 5,
              hard_timeout: float = 0, memory_mb: int = 4096, groups: list | None = None, progress=None) -> list:
    """``fn(payload, timeout)`` for every payload in worker processes; results in order.

    workers: processes (0: the CPU count, at most one per payload); hard_timeout: seconds
    per task before its worker is killed (0: 4 x timeout + 5); memory_mb: each worker's
    address-space limit (0: none); groups: a key per payload, tasks of one group going to
    one worker where possible; progress: called with 1 after each finished task.
    """
    if not payloads:
        return []
    on_fail = _resolve(fallback)
    hard = hard_timeout or 4 * timeout + 5
    n = max(1, min(workers or os.cpu_count() or 1, len(payloads)))
    key = (memory_mb, timeout)
    idle = [w for w in _POOLS.pop(key, []) if w.proc.is_alive()]
    pool, spare = idle[:n], idle[n:]
    pool += [_Worker(memory_mb, timeout) for _ in range(n - len(pool))]
    results: list = [None] * len(payloads)
    todo = _Queue(groups if groups is not None else list(range(len(payloads))))
    done = 0

    def finish(idx, value):
        nonlocal done
        results[idx] = value
        done += 1
        if progress:
            progress(1)

    try:
        while done < len(payloads):
            for w in pool:
                if w.ready and w.task is None and todo:
                    i = todo.take(w, {v.group for v in pool if v is not w})
                    w.conn.send((i, fn, payloads[i]))
                    w.task = (i, time.monotonic())
            for conn in wait([w.conn for w in pool], timeout=0.05):
                k, w = next((k, w) for k, w in enumerate(pool) if w.conn is conn)
                try:
                    idx, value, status = conn.recv()
                except EOFError:  # the worker died (killed by the OS, or could not start)
                    if not w.ready:
                        raise _start_error(w, memory_mb) from None
                    w.proc.join(timeout=1)
                    pool[k] = _Worker(memory_mb, timeout)
                    if w.task:
                        finish(w.task[0], on_fail(payloads[w.task[0]], "crash"))
                    continue
                if idx == "ready":
                    w.ready = True
                    continue
                w.task = None
                finish(idx, on_fail(payloads[idx], status) if status else value)
            now = time.monotonic()
            for k, w in enumerate(pool):
                if w.task and now - w.task[1] > hard:
                    w.proc.kill()
                    w.proc.join()
                    finish(w.task[0], on_fail(payloads[w.task[0]], "timeout"))
                    pool[k] = _Worker(memory_mb, timeout)
                elif not w.ready and now - w.born > START_TIMEOUT:
                    raise GraderStartError(f"no grader worker became ready within {START_TIMEOUT:.0f} s "
                                           "(is the machine overloaded, or math-verify's import hanging?)")
    except BaseException:  # workers may be mid-task: never reuse them
        for w in pool + spare:
            w.stop()
        raise
    _POOLS[key] = pool + spare
    return results
