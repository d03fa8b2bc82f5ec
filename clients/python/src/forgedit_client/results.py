"""The finished result of a job, assembled from its events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forgedit_client.events import (
    Accepted,
    Captioned,
    Completed,
    Event,
    ImageReady,
    PhaseTimings,
    Preview,
    Registered,
    TrainingProgress,
)


@dataclass
class JobResult:
    """What an Edit or Sample job produced.

    ``images`` are in arrival order (sort by ``index`` for sweep order); ``losses`` holds the
    training loss after each update (Edit only); ``timings`` and ``train_seed`` come from the
    final ``Completed`` event; ``registered`` is the ``Registered`` event of an Edit job
    (``deduplicated``/``spooled`` tell how the registry stored it); ``previews`` are the
    ``Preview`` events in arrival order (never results; the server bounds them per job).
    """

    request_id: str
    job_id: str = ""
    edit_model_id: str = ""
    source_prompt: str | None = None
    images: list[ImageReady] = field(default_factory=list)
    previews: list[Preview] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    registered: Registered | None = None
    timings: PhaseTimings | None = None
    train_seed: int | None = None
    images_total: int = 0
    completed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no PNG bytes)."""
        return {
            "request_id": self.request_id,
            "job_id": self.job_id,
            "edit_model_id": self.edit_model_id,
            "source_prompt": self.source_prompt,
            "train_seed": self.train_seed,
            "deduplicated": self.registered.deduplicated if self.registered else None,
            "spooled": self.registered.spooled if self.registered else None,
            "timings": self.timings.to_dict() if self.timings else None,
            "images": [
                {
                    "index": i.index,
                    "width": i.width,
                    "height": i.height,
                    "format": i.format,
                    **i.params.to_dict(),
                }
                for i in sorted(self.images, key=lambda i: i.index)
            ],
            "previews": len(self.previews),
        }


class ResultCollector:
    """Folds events into a ``JobResult`` as they pass (the stream feeds it every event)."""

    def __init__(self, request_id: str) -> None:
        self.result = JobResult(request_id=request_id)

    def add(self, event: Event) -> None:
        r = self.result
        r.job_id = r.job_id or event.job_id
        if isinstance(event, Accepted):
            r.images_total = event.images_total
        elif isinstance(event, Captioned):
            r.source_prompt = event.source_prompt
        elif isinstance(event, TrainingProgress):
            r.losses.append(event.loss)
        elif isinstance(event, Registered):
            r.registered = event
            r.edit_model_id = event.edit_model_id
        elif isinstance(event, ImageReady):
            r.images.append(event)
        elif isinstance(event, Preview):
            r.previews.append(event)
        elif isinstance(event, Completed):
            r.timings = event.timings
            r.edit_model_id = event.edit_model_id or r.edit_model_id
            r.train_seed = event.train_seed if r.registered is not None else None
            r.completed = True
