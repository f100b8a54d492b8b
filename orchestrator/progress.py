"""Progress you can watch: the farm's actors and Ray Train workers report their steps to a small hub
actor, and the driver turns the sum into one bar (rate, ETA) or, with --no-progress, one line every
`PROGRESS_EVERY_S` seconds (env WEIGHTGEN_PROGRESS_EVERY_S; default 30).

    hub = new_hub()                       # driver; pass `hub` to the workers
    report(hub, key, done, total, ...)   # worker: throttled, fire-and-forget
    hub.snapshot.remote()                 # driver: {key: (done, total, info)}
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Self

import ray

PROGRESS_EVERY_S = float(os.environ.get("WEIGHTGEN_PROGRESS_EVERY_S", "30"))
REPORT_EVERY_S = 0.5  # how often a worker sends its step to the hub


@ray.remote(num_cpus=0)
class ProgressHub:
    """Latest (done, total, info) per unit of work (a shard, a model), as the workers report it."""

    def __init__(self):
        self.units: dict[str, tuple[float, float, dict]] = {}

    def update(self, key: str, done: float, total: float, info: dict | None = None) -> None:
        self.units[key] = (done, total, info or {})

    def snapshot(self, keys: list[str] | None = None) -> dict:
        """Every unit's latest report, or only those of `keys`."""
        return self.units if keys is None else {k: self.units[k] for k in keys if k in self.units}


def new_hub():
    """A hub for this driver (no CPU; it dies with the driver)."""
    return ProgressHub.options(num_cpus=0, max_concurrency=4).remote()


class Reporter:
    """Worker side: sends (done, total) to the hub at most every REPORT_EVERY_S per key, and always the last step."""

    def __init__(self, hub):
        self.hub = hub
        self.last: dict[str, float] = {}

    def __call__(self, key: str, done: float, total: float, info: dict | None = None) -> None:
        if self.hub is None:
            return
        now = time.monotonic()
        if done < total and now - self.last.get(key, -1e9) < REPORT_EVERY_S:
            return
        self.last[key] = now
        try:
            self.hub.update.remote(key, done, total, info)
        except Exception:  # noqa: BLE001 - progress must never break training
            self.hub = None


def fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """One progress display on the driver: a tqdm bar, or a line every `every_s` seconds.

    Position is absolute (`update_to`), may be fractional (experts partly trained), and never goes back.
    The rate is measured over the last `window_s` seconds; `first_eta_s` is the time from creation to the
    first update that gave an ETA.
    """

    def __init__(self, total: float, desc: str, unit: str, enabled: bool, log: Callable[[str], None] = print,
                 every_s: float | None = None, window_s: float = 60.0, on_eta: Callable[[float], None] | None = None):
        self.total, self.desc, self.unit, self.enabled, self.log = total, desc, unit, enabled, log
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.window_s, self.on_eta = window_s, on_eta
        self.t0 = time.monotonic()
        self.n = 0.0
        self.history: list[tuple[float, float]] = []  # (time, position) at each advance
        self.first_eta_s: float | None = None
        self.last_line = -1e9
        self.postfix = ""
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            # rate and ETA are this class's (measured on real progress), not tqdm's (which counts start-up)
            n = "{n:.1f}" if unit == "expert" else "{n:.0f}"
            fmt = "{desc}: {percentage:3.0f}%|{bar}| " + n + "/{total:.0f} {unit}s [{elapsed}{postfix}]"
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, bar_format=fmt)
            self.bar.set_postfix_str("ETA ?", refresh=False)

    def rate(self, now: float) -> float | None:
        """Units per second since the newest point older than the window, else since the first progress; None
        until that is a second old (start-up, before the first step, does not count)."""
        if not self.history:
            return None
        older = [p for p in self.history if now - p[0] > self.window_s]
        t_s, n_s = older[-1] if older else self.history[0]
        if now - t_s < 1.0 or self.n <= n_s:
            return None
        return (self.n - n_s) / (now - t_s)

    def eta(self, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if self.n >= self.total:
            return 0.0
        r = self.rate(now)
        return None if not r else max(0.0, (self.total - self.n) / r)

    def update_to(self, n: float, postfix: str = "") -> None:
        n = min(max(n, self.n), self.total)
        now = time.monotonic()
        if n > self.n:
            self.history.append((now, n))
            older = [i for i, p in enumerate(self.history) if now - p[0] > self.window_s]
            if len(older) > 1:
                del self.history[:older[-1]]  # keep one point older than the window as the anchor
        delta, self.n, self.postfix = n - self.n, n, postfix
        eta = self.eta(now)
        if eta is not None:
            if self.first_eta_s is None:
                self.first_eta_s = now - self.t0
            if self.on_eta is not None:
                self.on_eta(eta)
        if self.bar is not None:
            r = self.rate(now)
            shown = (f"{r:.2f} {self.unit}s/s, " if r else "") + f"ETA {fmt_eta(eta)}" + (f"; {postfix}" if postfix else "")
            self.bar.set_postfix_str(shown, refresh=False)
            self.bar.update(delta) if delta else self.bar.refresh()
        elif self.every_s > 0 and eta is not None and (now - self.last_line >= self.every_s or n >= self.total):
            self.last_line = now
            self.log(self.line(now, eta))

    def line(self, now: float, eta: float | None) -> str:
        r = self.rate(now) or (self.n / max(now - self.t0, 1e-9) if self.n >= self.total else None)
        pct = 100.0 * self.n / self.total if self.total else 100.0
        n = f"{self.n:.1f}" if self.unit == "expert" else f"{self.n:.0f}"
        return (f"{self.desc}: {n}/{self.total:.0f} {self.unit}s ({pct:.0f}%), "
                f"{(r or 0):.2f} {self.unit}s/s, ETA {fmt_eta(eta)}, elapsed {fmt_eta(now - self.t0)}"
                + (f"; {self.postfix}" if self.postfix else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Watcher:
    """Driver thread that polls a hub every `poll_s` and shows the sum of its units on a `Progress`."""

    def __init__(self, hub, progress: Progress, poll_s: float = 1.0,
                 describe: Callable[[dict], str] | None = None):
        self.hub, self.progress, self.poll_s, self.describe = hub, progress, poll_s, describe
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="weightgen-progress", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)
        if exc[0] is None:
            self.poll()
        self.progress.close()

    def poll(self) -> None:
        try:
            units = ray.get(self.hub.snapshot.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a missed poll only delays the bar
            return
        done = sum(d for d, _, _ in units.values())
        self.progress.update_to(done, self.describe(units) if self.describe else "")

    def _run(self) -> None:
        while not self.stop_event.wait(self.poll_s):
            self.poll()
