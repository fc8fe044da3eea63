"""Progress of the command line's waits, on stderr: a bar on a terminal (tqdm), plain periodic lines otherwise.

Every wait that can pass a second reports through here: cluster start, prefill (chunks done of total), denoising
(step of steps), evaluation and batch progress. `--quiet` silences it (`configure(quiet=True)`). Off a terminal a
bar prints its first line once the wait has lasted `first_after_s` (1 s), then at most one every `period_s`, and the
final count when it ends, so short waits print nothing and logs stay short.
`clock` is injectable so the plain-line schedule is testable without sleeping.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_state = {"quiet": False}


def configure(quiet: bool = False) -> None:
    _state["quiet"] = quiet


def quiet() -> bool:
    return _state["quiet"]


def note(text: str, stream: TextIO | None = None) -> None:
    """One line of progress (a stage started or ended)."""
    if not _state["quiet"]:
        print(f"pdllm: {text}", file=stream or sys.stderr, flush=True)


class Bar:
    """Progress of `total` units of one wait; `update_to(n)` as work is done, `close()` at the end."""

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str,
        stream: TextIO | None = None,
        period_s: float = 2.0,
        first_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
        quiet: bool | None = None,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream or sys.stderr
        self.period_s, self.first_after_s, self.clock = period_s, first_after_s, clock
        self.n, self.postfix = 0, ""
        self._start, self._printed = clock(), -1
        self.enabled = not (_state["quiet"] if quiet is None else quiet)
        self.tty = self.stream.isatty() if tty is None else tty
        self._tqdm = None
        self._last: float | None = None
        if self.enabled and self.tty:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False, dynamic_ncols=True)

    def _line(self) -> None:
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"pdllm: {self.desc}: {self.n}/{self.total} {self.unit}{extra}", file=self.stream, flush=True)
        self._last, self._printed = self.clock(), self.n

    def update_to(self, n: int, total: int | None = None, postfix: str = "") -> None:
        if total is not None and total != self.total:
            self.total = total
            if self._tqdm is not None:
                self._tqdm.total = total
        delta, self.n, self.postfix = n - self.n, n, postfix
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.update(delta)
            if postfix:
                self._tqdm.set_postfix_str(postfix)
        elif self._last is None:
            if self.clock() - self._start >= self.first_after_s:
                self._line()
        elif self.clock() - self._last >= self.period_s:
            self._line()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        elif self.enabled and self._last is not None and self._printed != self.n:
            self._line()  # the final count, unless it was just printed

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RequestProgress:
    """The events of one generation request (`{"type": "prefill" | "step", ...}`, as backends emit them) shown as a
    prefill bar and a denoising bar."""

    def __init__(self, stream: TextIO | None = None, **bar_kwargs) -> None:
        self.stream, self.bar_kwargs = stream, bar_kwargs
        self.prefill: Bar | None = None
        self.denoise: Bar | None = None

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "prefill" and int(event.get("total_chunks", 0)) > 0:
            total = int(event["total_chunks"])
            if self.prefill is None:
                self.prefill = Bar("prefill", total, "chunks", self.stream, **self.bar_kwargs)
            reused = int(event.get("reused_chunks", 0))
            self.prefill.update_to(int(event.get("done_chunks", 0)), total, f"{reused} reused" if reused else "")
        elif kind == "step":
            if self.prefill is not None:
                self.prefill.close()
                self.prefill = None
            total = int(event.get("total_steps", 0))
            if self.denoise is None:
                self.denoise = Bar("denoise", total, "steps", self.stream, **self.bar_kwargs)
            self.denoise.update_to(int(event["step"]), total)

    def on_step(self, total_steps: int) -> Callable:
        """An engine `on_step(step, gen)` callback (in-process generation) feeding the denoising bar."""
        return lambda step, gen: self({"type": "step", "step": step, "total_steps": total_steps})

    def close(self) -> None:
        for bar in (self.prefill, self.denoise):
            if bar is not None:
                bar.close()
        self.prefill = self.denoise = None
