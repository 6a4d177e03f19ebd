"""The live progress line: epoch, step, loss, images/s and ETA."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


@dataclass
class ProgressMeter:
    """Throughput over the last logging window's training steps; ETA from the run's own pace.

    Time the loop spends on other work (validation, checkpoints) is ``excluded`` from the
    window, so images/s says how fast training runs, not how often it pauses."""

    total_steps: int
    start_step: int = 0
    clock: Callable[[], float] = time.perf_counter
    _t0: float = field(default=-1.0)
    _window_t: float = field(default=-1.0)
    _window_images: int = 0
    _window_steps: int = 0
    _window_wait: float = 0.0
    _window_excluded: float = 0.0

    def __post_init__(self) -> None:
        self._t0 = self._window_t = self.clock()

    def update(self, images: int, steps: int = 1) -> None:
        self._window_images += images
        self._window_steps += steps

    def waited(self, seconds: float) -> None:
        """Time the loop spent waiting for the loader's next batch."""
        self._window_wait += seconds

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """The block's time does not count in the window's throughput."""
        start = self.clock()
        try:
            yield
        finally:
            self._window_excluded += self.clock() - start

    def flush(self, step: int) -> dict[str, float]:
        """Figures for the window since the last flush; resets the window."""
        now = self.clock()
        elapsed = max(now - self._window_t - self._window_excluded, 1e-9)
        done = max(step - self.start_step, 1)
        pace = (now - self._t0) / done
        figures = {
            "images_per_s": self._window_images / elapsed,
            "step_time_s": elapsed / max(self._window_steps, 1),
            "eta_s": pace * max(self.total_steps - step, 0),
            "data_wait_frac": min(1.0, self._window_wait / elapsed),
        }
        self._window_t, self._window_images, self._window_steps = now, 0, 0
        self._window_wait = self._window_excluded = 0.0
        return figures

    def line(self, *, epoch: int, epochs: int, step: int, loss: float, lr: float, figures: dict[str, float]) -> str:
        return (
            f"epoch {epoch + 1}/{epochs} step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.3e} "
            f"{figures['images_per_s']:.1f} img/s {figures['step_time_s']:.3f} s/step "
            f"eta {format_duration(figures['eta_s'])}"
        )
