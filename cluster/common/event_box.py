"""A bounded hand-off of progress events from a running job to whoever streams them out.

Why bounded and coalescing: a reader that falls behind (slow network, a client that stopped reading) must cost
neither memory nor decode speed. Step events are progress reports, so when the box is full the newest step replaces
the oldest waiting one; terminal items (the result, an error) are never dropped.
"""

from __future__ import annotations

import threading
from collections import deque


class EventBox:
    def __init__(self, limit: int = 8) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self._items: deque = deque()
        self._cond = threading.Condition()
        self.dropped = 0  # step events replaced by a newer one

    def put_step(self, event: dict) -> None:
        """Queue a progress event; when full, drop the oldest waiting progress event to make room."""
        with self._cond:
            if len(self._items) >= self.limit:
                for i, item in enumerate(self._items):
                    if isinstance(item, dict) and item.get("type") == "step":
                        del self._items[i]
                        self.dropped += 1
                        break
            self._items.append(event)
            self._cond.notify_all()

    def put_final(self, item: object) -> None:
        """Queue the terminal item (a result dict or an exception): always kept."""
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()

    def get(self, timeout_s: float | None = None) -> object:
        """The next item; TimeoutError when none arrives within `timeout_s`."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items, timeout_s):
                raise TimeoutError(f"no event within {timeout_s}s")
            return self._items.popleft()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)
