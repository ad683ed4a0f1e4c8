"""A closed-loop load for serving tests: ``concurrency`` clients, each sending the next
``POST /v1/recommendations`` when its answer arrives, cycling through ``n_users`` user ids
(u0, u1, ...), in a thread of its own. Every answer is kept as an ``Answer``; a test reads
them while the load runs (``wait_until``) and after it stops."""

import asyncio
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import httpx


class Answer(NamedTuple):
    status: int  # 0 when the request got no HTTP answer at all
    user: str
    version: int | None
    variant: str | None
    fallback: str | None
    items: tuple[str, ...]


class ClosedLoop:
    def __init__(self, url: str, concurrency: int = 8, n_users: int = 40, k: int = 5) -> None:
        self.url, self.concurrency, self.n_users, self.k = url, concurrency, n_users, k
        self.results: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self, client: httpx.AsyncClient, worker: int) -> None:
        n = worker
        while not self._stop.is_set():
            n += self.concurrency
            user = f"u{n % self.n_users}"
            try:
                resp = await client.post("/v1/recommendations", json={"user_id": user, "k": self.k})
            except httpx.HTTPError:
                self.results.append(Answer(0, user, None, None, None, ()))
                continue
            body = resp.json() if resp.status_code == 200 else {}
            self.results.append(Answer(resp.status_code, user, (body.get("model") or {}).get("version"),
                                       body.get("variant"), body.get("fallback"),
                                       tuple(i["item_id"] for i in body.get("items", []))))

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=60) as client:
            await asyncio.gather(*(self._client(client, w) for w in range(self.concurrency)))

    def __enter__(self) -> "ClosedLoop":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_until(self, what: str, done: Callable[[list[Answer]], bool], timeout: float = 90,
                   window: int | None = None) -> float:
        """Until ``done(the last window answers)`` holds (window: twice the concurrency by
        default); returns the seconds it took."""
        window = window or 2 * self.concurrency
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            tail = self.results[-window:]
            if len(tail) == window and done(tail):
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"{what} did not happen within {timeout}s: last answers {self.results[-5:]}")

    def statuses(self) -> list[int]:
        return [a.status for a in self.results]
