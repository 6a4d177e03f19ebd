"""The live progress line: epoch, step, loss, images/s and ETA."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


@dataclass
class ProgressMeter:
    """Throughput over the last logging window; ETA from the run's own average pace."""

    total_steps: int
    start_step: int = 0
    _t0: float = field(default_factory=time.perf_counter)
    _window_t: float = field(default_factory=time.perf_counter)
    _window_images: int = 0
    _window_steps: int = 0
    _window_wait: float = 0.0

    def update(self, images: int, steps: int = 1) -> None:
        self._window_images += images
        self._window_steps += steps

    def waited(self, seconds: float) -> None:
        """Time the loop spent waiting for the loader's next batch."""
        self._window_wait += seconds

    def flush(self, step: int) -> dict[str, float]:
        """Figures for the window since the last flush; resets the window."""
        now = time.perf_counter()
        elapsed = max(now - self._window_t, 1e-9)
        done = max(step - self.start_step, 1)
        pace = (now - self._t0) / done
        figures = {
            "images_per_s": self._window_images / elapsed,
            "step_time_s": elapsed / max(self._window_steps, 1),
            "eta_s": pace * max(self.total_steps - step, 0),
            "data_wait_frac": min(1.0, self._window_wait / elapsed),
        }
        self._window_t, self._window_images, self._window_steps, self._window_wait = now, 0, 0, 0.0
        return figures

    def line(self, *, epoch: int, epochs: int, step: int, loss: float, lr: float, figures: dict[str, float]) -> str:
        return (
            f"epoch {epoch + 1}/{epochs} step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.3e} "
            f"{figures['images_per_s']:.1f} img/s {figures['step_time_s']:.3f} s/step "
            f"eta {format_duration(figures['eta_s'])}"
        )
