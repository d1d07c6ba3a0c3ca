"""Failed-login throttling for the dashboard: password guessing gets a few tries, then a pause.

Counted per user name (whether or not it exists, so the answer does not tell which names do) and, more
loosely, per client address (one address guessing many names). A moving window from the ``limits``
library, in this process's memory: the ``web`` role is one process, and a restart forgets the counts,
which only ever gives a guesser a few more tries.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerMinute, storage, strategies

# One client address may fail this many times more than one user name: several people behind one NAT or
# reverse proxy share an address.
ADDRESS_FACTOR = 4


class LoginThrottle:
    """``max_failures`` failed logins per user name within ``window_minutes`` (× ADDRESS_FACTOR per address)."""

    def __init__(self, max_failures: int, window_minutes: int) -> None:
        self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        self._per_user = RateLimitItemPerMinute(max_failures, window_minutes)
        self._per_address = RateLimitItemPerMinute(max_failures * ADDRESS_FACTOR, window_minutes)

    def _keys(self, username: str, address: str) -> list[tuple[RateLimitItemPerMinute, tuple[str, str]]]:
        return [(self._per_user, ("user", username.casefold())), (self._per_address, ("address", address))]

    def retry_after(self, username: str, address: str) -> int:
        """Seconds until this user name / address may try again; 0 when it may try now."""
        waits = [
            self._limiter.get_window_stats(item, *key).reset_time - time.time()
            for item, key in self._keys(username, address)
            if not self._limiter.test(item, *key)
        ]
        return max(1, math.ceil(max(waits))) if waits else 0

    def failed(self, username: str, address: str) -> None:
        for item, key in self._keys(username, address):
            self._limiter.hit(item, *key)

    def succeeded(self, username: str) -> None:
        """A correct password clears the user name's failures (the address keeps its count)."""
        self._limiter.clear(self._per_user, "user", username.casefold())
