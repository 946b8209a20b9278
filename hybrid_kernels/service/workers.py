"""Bounded execution for blocking model/index work: ``workers`` threads, at most ``queue_limit``
requests waiting for one (more are refused at once with :class:`QueueFull`, answered 503), and a
per-request timeout (:class:`asyncio.TimeoutError`, answered 504)."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable, Dict, TypeVar

T = TypeVar("T")


class QueueFull(RuntimeError):
    pass


class WorkerPool:
    def __init__(self, workers: int, queue_limit: int, timeout_s: float):
        if workers < 1:
            raise ValueError(f"workers must be >= 1; got {workers}")
        if queue_limit < 0:
            raise ValueError(f"queue_limit must be >= 0; got {queue_limit}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0; got {timeout_s}")
        self.workers, self.queue_limit, self.timeout_s = workers, queue_limit, timeout_s
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hk-serve")
        self._lock = threading.Lock()
        self._admitted = 0            # running + waiting
        self.rejected = 0

    def _admit(self) -> None:
        with self._lock:
            if self._admitted >= self.workers + self.queue_limit:
                self.rejected += 1
                raise QueueFull(f"{self._admitted} requests in flight (limit "
                                f"{self.workers} running + {self.queue_limit} queued)")
            self._admitted += 1

    def _release(self, _future=None) -> None:
        with self._lock:
            self._admitted -= 1

    def submit(self, fn: Callable[..., T], *args) -> Awaitable[T]:
        """Admit ``fn(*args)`` now (raises :class:`QueueFull` at once) and return an awaitable of
        its result with the timeout. The slot is held until ``fn`` really ends (a timed-out call
        keeps its thread until it returns, so the bound stays true)."""
        self._admit()
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._release)
        return asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await self.submit(fn, *args)

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {"workers": self.workers, "queue_limit": self.queue_limit,
                    "in_flight": self._admitted, "rejected": self.rejected}

    def shutdown(self) -> None:
        """Wait for every accepted call (writes included) to finish."""
        self._executor.shutdown(wait=True)
