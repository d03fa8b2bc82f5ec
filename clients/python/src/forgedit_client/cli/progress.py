"""The live progress display on stderr: queue position, a training bar with loss and ETA, a
sampling bar. Bars only draw on a terminal (tqdm disables itself otherwise); milestone lines
(accepted, caption, registered) are printed either way unless ``quiet``."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

from forgedit_client.events import (
    Accepted,
    Captioned,
    Completed,
    Event,
    Heartbeat,
    ImageReady,
    Preview,
    Queued,
    Registered,
    SamplingProgress,
    TrainingProgress,
)


class ProgressDisplay:
    """Feed it every event with ``show``; call ``close`` at the end (also on errors)."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self._training: tqdm | None = None
        self._sampling: tqdm | None = None
        self._images = 0

    def say(self, text: str) -> None:
        """A milestone line, printed above any bar."""
        if not self.quiet:
            tqdm.write(text, file=self.stream)

    def show(self, event: Event) -> None:
        if self.quiet:
            return
        if isinstance(event, Accepted):
            where = f"queue position {event.queue_position}" if event.queue_position else "starting"
            self.say(
                f"job {event.job_id} accepted: {event.images_total} images, {where}, "
                f"estimated {event.estimated_seconds:.0f} s"
            )
        elif isinstance(event, Queued):
            self.say(f"queue position {event.position}")
        elif isinstance(event, Heartbeat):
            bar = self._sampling or self._training
            if bar is not None:
                bar.refresh()
            elif event.state == "queued" and event.queue_position:
                self.say(f"waiting: queue position {event.queue_position}")
        elif isinstance(event, Preview):
            if event.kind == "training_free":
                self.say(
                    f"preview ready ({event.width}x{event.height}, training-free: the base "
                    "model's take, not the result)"
                )
        elif isinstance(event, Captioned):
            origin = "caption" if event.from_caption else "given"
            self.say(f"source prompt ({origin}): {event.source_prompt}")
        elif isinstance(event, TrainingProgress):
            bar = self._training
            if bar is None:
                bar = self._training = self._bar("training", event.total, "update")
            bar.total = event.total
            bar.n = event.update
            bar.set_postfix_str(
                f"{event.stage} loss={event.loss:.4f} eta={event.eta_seconds:.0f}s", refresh=True
            )
        elif isinstance(event, Registered):
            self._close_bar("_training")
            how = " (reused an identical edit model)" if event.deduplicated else ""
            if event.spooled:
                how += " (registry unreachable: spooled on the server, registered later)"
            self.say(f"edit model {event.edit_model_id} v{event.version}{how}")
        elif isinstance(event, SamplingProgress):
            bar = self._sampling
            if bar is None:
                bar = self._sampling = self._bar("sampling", event.images_total, "image")
            bar.n = event.images_done
            bar.set_postfix_str(f"{event.forget} step {event.step}/{event.steps}", refresh=True)
        elif isinstance(event, ImageReady):
            self._images += 1
            if self._sampling is not None:
                self._sampling.n = max(self._sampling.n, self._images)
                self._sampling.refresh()
        elif isinstance(event, Completed):
            self._close_bar("_sampling")
            self.say(f"completed in {event.timings.total_seconds:.1f} s")

    def _bar(self, desc: str, total: int, unit: str) -> tqdm:
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=self.stream,
            disable=None,  # None: draw only when the stream is a terminal
            dynamic_ncols=True,
            leave=True,
        )

    def _close_bar(self, name: str) -> None:
        bar = getattr(self, name)
        if bar is not None:
            bar.close()
            setattr(self, name, None)

    def close(self) -> None:
        self._close_bar("_training")
        self._close_bar("_sampling")
