"""Redis locks held by a lease that a background thread keeps extending.

A worker killed with SIGKILL cannot release what it holds; with a short lease, its lock expires within
`lease` seconds and another worker takes the work over, instead of a lock timed for the longest run
blocking the project for many minutes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import redis
from redis.lock import Lock

log = logging.getLogger(__name__)


@contextlib.contextmanager
def leased(client: redis.Redis, key: str, lease: float = 30.0, wait: float = 0.0) -> Iterator[bool]:
    """Yields True while this process holds `key` (waiting up to `wait` seconds for it), else False."""
    lock = Lock(client, key, timeout=lease, blocking=wait > 0, blocking_timeout=wait or None, thread_local=False)
    if not lock.acquire():
        yield False
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease / 3):
            try:
                lock.reacquire()
            except Exception as exc:  # lost (expired, or Redis away): the holder finds out when releasing
                log.warning("lock %s: cannot extend its lease: %s", key, exc)

    keeper = threading.Thread(target=renew, name=f"lease {key}", daemon=True)
    keeper.start()
    try:
        yield True
    finally:
        stop.set()
        keeper.join()
        with contextlib.suppress(redis.exceptions.LockError, redis.RedisError):
            lock.release()
