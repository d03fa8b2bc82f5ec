"""Progress bars on stderr (stdout carries only the result)."""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

from forgedit.events import SamplingProgress, TrainingProgress

if TYPE_CHECKING:
    from tqdm import tqdm


class Progress:
    """tqdm bars for training (per update, with the loss) and sampling (per denoising step
    of every image in the running batch)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._train: tqdm[None] | None = None
        self._sample: tqdm[None] | None = None

    def training(self, p: TrainingProgress) -> None:
        from tqdm import tqdm

        if self._train is None:
            self._train = tqdm(
                total=p.total, desc="training", unit="update", file=self.stream, dynamic_ncols=True
            )
        self._train.set_description(f"training ({p.stage})")
        self._train.set_postfix(loss=f"{p.loss:.4f}", refresh=False)
        self._train.update(p.update - self._train.n)

    def sampling(self, p: SamplingProgress) -> None:
        from tqdm import tqdm

        total = p.images_total * p.steps
        if self._sample is None:
            self._sample = tqdm(
                total=total, desc="sampling", unit="step", file=self.stream, dynamic_ncols=True
            )
        self._sample.set_description(f"sampling {p.forget}")
        self._sample.set_postfix(images=f"{p.images_done}/{p.images_total}", refresh=False)
        self._sample.update(p.images_done * p.steps + p.batch_images * p.step - self._sample.n)

    def image_done(self, done: int, total: int) -> None:
        if self._sample is not None:
            self._sample.set_postfix(images=f"{done}/{total}")

    def close(self) -> None:
        for bar in (self._train, self._sample):
            if bar is not None:
                bar.close()
        self._train = self._sample = None
