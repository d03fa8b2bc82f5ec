"""Edit every pair of a benchmark folder, score every output, pick the best per pair.

    pairs = read_dataset("tedbench")
    editor = InProcessEditor(Engine.load(...))          # or RemoteEditor(client, "sd14")
    report = evaluate(pairs, editor, Scorers(clip=ClipScorer.load(DIR)), EvalOptions())
    write_report(report, "out/eval")

1. Each pair is edited as the service edits: BLIP's caption (or the pair's ``source_text``
   with ``use_source_text``) → fine-tune → the sweep (the variant's defaults unless given).
2. Each output is scored against the target text and the input (``forgedit.eval.scorers``).
3. **The best output of a pair** is the one with the highest CLIP directional similarity
   (the change from input to output that best follows the change from source text to
   target text); ties go to the higher SSIM to the input. The rule is automatic, where the
   paper picked by hand from each grid.
4. ``write_report`` writes ``scores.json`` (everything, with per-pair bests and means),
   ``scores.csv`` (one row per output), ``images/PAIR/*.png`` and one contact sheet per pair
   (``sheets/PAIR.png``, each tile labelled with its scores, the best marked), built in a
   temporary directory and renamed into place.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from forgedit.config import TrainingMode
from forgedit.errors import ForgeditError, InvalidInputError
from forgedit.eval.dataset import Pair
from forgedit.eval.scorers import ClipScorer, Lpips, psnr, ssim, to_tensor
from forgedit.options import SweepOptions, TrainingOptions

if TYPE_CHECKING:
    from PIL import Image

    from forgedit.engine import Engine
    from forgedit.images import LoadedImage

BEST_RULE = (
    "highest CLIP directional similarity (input→output vs source→target text); ties: higher "
    "SSIM to the input"
)
METRICS = ("clip_score", "clip_source_score", "clip_direction", "lpips", "ssim", "psnr")


@dataclass(frozen=True)
class EvalOptions:
    """How each pair is edited. ``None`` fields take the variant's defaults."""

    mode: TrainingMode = "joint"
    forget: tuple[str, ...] | None = None
    gammas: tuple[float, ...] | None = None
    seeds: tuple[int, ...] = (1,)
    use_source_text: bool = False

    def sweep_options(self) -> SweepOptions:
        """The sweep as the engine's builder takes it (unset fields: the variant's)."""
        return SweepOptions(
            forget_strategies=self.forget or (), gammas=self.gammas or (), seeds=self.seeds
        )

    def sweep_fields(self) -> dict[str, Any]:
        """The same sweep as the SDK's keywords."""
        given: dict[str, Any] = {"seeds": self.seeds}
        if self.forget is not None:
            given["forget"] = self.forget
        if self.gammas is not None:
            given["gammas"] = self.gammas
        return given


@dataclass(frozen=True)
class EditOutput:
    index: int
    params: dict[str, Any]  # forget, interpolation, gamma, alpha, seed, guidance, steps
    image: Image.Image


@dataclass(frozen=True)
class PairEdit:
    source_prompt: str
    edit_model_id: str | None
    outputs: list[EditOutput]
    seconds: float


class Editor(Protocol):
    """Edits one pair: in process or through a running server."""

    description: str
    base_model: str

    def edit(self, pair: Pair, image: LoadedImage, options: EvalOptions) -> PairEdit: ...


class InProcessEditor:
    """Edits with an ``Engine`` in this process (no registry: ``edit_model_id`` is None)."""

    def __init__(self, engine: Engine, base_model: str) -> None:
        self.engine = engine
        self.base_model = base_model
        self.description = f"in process, base model {base_model}"

    def edit(self, pair: Pair, image: LoadedImage, options: EvalOptions) -> PairEdit:
        from forgedit.requests import build_sweep, build_training, training_with_seed

        started = time.perf_counter()
        engine = self.engine
        source = _given_source(pair, options)
        if source is None:
            if not engine.can_caption:
                raise InvalidInputError(
                    f"pair {pair.index} ({pair.img_name}): no captioner is loaded; give --blip "
                    "or a dataset with source_text and --use-source-text",
                    field="blip",
                )
            source = engine.source_prompt(image.image, pair.target_text)
        config, seed_from = build_training(
            TrainingOptions(mode=options.mode),
            native_height=engine.native_height,
            native_width=engine.native_width,
            precision=engine.precision,
        )
        config = training_with_seed(
            config,
            seed_from,
            image_sha256=image.sha256,
            base_fingerprint=engine.fingerprint,
            source_prompt=source,
        )
        model = engine.finetune(image.image, source, config, image_sha256=image.sha256)
        sweep = build_sweep(options.sweep_options(), (pair.target_text,), config.mode)
        outputs = [
            EditOutput(edited.spec.index, _spec_params(edited.spec), edited.image)
            for edited in engine.sample(model, sweep)
        ]
        return PairEdit(source, None, outputs, time.perf_counter() - started)


class RemoteEditor:
    """Edits through a running forgedit-server with the SDK (its registry keeps the edit
    models; their IDs come back)."""

    def __init__(self, client: Any, target: str, base_model: str | None) -> None:
        self.client = client
        self.target = target
        self.base_model = base_model or ""
        self.description = f"server {target}, base model {base_model or '(its default)'}"

    def edit(self, pair: Pair, image: LoadedImage, options: EvalOptions) -> PairEdit:
        """The pair edited by the server; a refusal or failure the SDK reports (after its
        retries) is a ``ForgeditError`` naming the pair and the server's status."""
        from forgedit_client.errors import ForgeditClientError

        try:
            return self._edit(pair, options)
        except ForgeditClientError as e:
            raise ForgeditError(
                f"pair {pair.index} ({pair.img_name}) through {self.target}: {e}"
            ) from e

    def _edit(self, pair: Pair, options: EvalOptions) -> PairEdit:
        from forgedit_client.events import Captioned, Completed, ImageReady, Registered
        from PIL import Image as PILImage

        started = time.perf_counter()
        fields = options.sweep_fields()
        stream = self.client.edit(
            pair.path.read_bytes(),
            pair.target_text,
            source_prompt=_given_source(pair, options),
            base_model=self.base_model or None,
            mode=options.mode,
            **{k: tuple(v) for k, v in fields.items()},
        )
        source, model_id = "", None
        outputs: list[EditOutput] = []
        for event in stream:
            if isinstance(event, Captioned):
                source = event.source_prompt
            elif isinstance(event, Registered | Completed):
                model_id = event.edit_model_id or model_id
            elif isinstance(event, ImageReady):
                params = _spec_params(event.params)
                picture = PILImage.open(io.BytesIO(event.png))
                picture.load()
                outputs.append(EditOutput(event.index, params, picture.convert("RGB")))
        return PairEdit(source, model_id, outputs, time.perf_counter() - started)


def _given_source(pair: Pair, options: EvalOptions) -> str | None:
    return pair.source_text if options.use_source_text and pair.source_text else None


def _spec_params(spec: Any) -> dict[str, Any]:
    """An image's sweep point, from the engine's ``ImageSpec`` or the SDK's ``ImageParams``
    (the same field names)."""
    return {
        "forget": spec.forget,
        "interpolation": spec.interpolation,
        "gamma": spec.gamma,
        "alpha": spec.alpha,
        "seed": spec.seed,
        "guidance": spec.guidance,
        "steps": spec.steps,
    }


# ----------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scorers:
    clip: ClipScorer
    lpips: Lpips | None = None
    clip_name: str = ""
    lpips_name: str | None = None


@dataclass
class ScoredOutput:
    output: EditOutput
    scores: dict[str, float | None]


@dataclass
class PairReport:
    pair: Pair
    edit: PairEdit
    direction_source: str  # the source text of the directional similarity
    input_image: Image.Image
    outputs: list[ScoredOutput]
    best: int  # position in ``outputs``

    @property
    def best_scores(self) -> dict[str, float | None]:
        return self.outputs[self.best].scores


@dataclass
class EvalReport:
    dataset: str
    editor: str
    base_model: str
    options: EvalOptions
    scorers: Scorers
    pairs: list[PairReport] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Means over pairs of each pair's best output, and over every output."""
        best = [p.best_scores for p in self.pairs]
        every = [o.scores for p in self.pairs for o in p.outputs]
        return {
            "pairs": len(self.pairs),
            "outputs": len(every),
            "best": _means(best),
            "all": _means(every),
        }


def score_pair(pair: Pair, image: LoadedImage, edit: PairEdit, scorers: Scorers) -> PairReport:
    """Score every output of one pair and pick its best (``BEST_RULE``)."""
    if not edit.outputs:
        raise InvalidInputError(f"pair {pair.index} ({pair.img_name}) produced no output")
    clip = scorers.clip
    direction_source = pair.source_text or edit.source_prompt
    input_embedding = clip.image_embedding(image.image)
    scored = []
    for output in edit.outputs:
        size = output.image.size
        reference = to_tensor(image.image, size)
        picture = to_tensor(output.image)
        embedding = clip.image_embedding(output.image)
        scores: dict[str, float | None] = {
            "clip_score": clip.score(embedding, pair.target_text),
            "clip_source_score": clip.score(embedding, direction_source),
            "clip_direction": clip.directional(
                input_embedding, embedding, direction_source, pair.target_text
            ),
            "lpips": (
                scorers.lpips.distance(picture, reference) if scorers.lpips is not None else None
            ),
            "ssim": ssim(picture, reference),
            "psnr": psnr(picture, reference),
        }
        scored.append(ScoredOutput(output, scores))
    best = max(
        range(len(scored)),
        key=lambda i: (scored[i].scores["clip_direction"], scored[i].scores["ssim"]),
    )
    return PairReport(pair, edit, direction_source, image.image, scored, best)


def evaluate(
    pairs: Iterable[Pair],
    editor: Editor,
    scorers: Scorers,
    options: EvalOptions,
    *,
    dataset: str = "",
    on_pair: Callable[[PairReport], None] | None = None,
) -> EvalReport:
    """Edit and score every pair in order; ``on_pair`` sees each finished pair."""
    from forgedit.images import load_image

    report = EvalReport(dataset, editor.description, editor.base_model, options, scorers)
    for pair in pairs:
        image = load_image(pair.path)
        scored = score_pair(pair, image, editor.edit(pair, image, options), scorers)
        report.pairs.append(scored)
        if on_pair is not None:
            on_pair(scored)
    return report


def _means(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for metric in METRICS:
        values = [v for r in rows if (v := r.get(metric)) is not None and math.isfinite(v)]
        out[metric] = statistics.fmean(values) if values else None
    return out


# ----------------------------------------------------------------------------------------------
# Writing


def write_report(report: EvalReport, out: str | os.PathLike[str]) -> Path:
    """Write the report to ``out`` (new or empty), atomically: built beside it, renamed."""
    from forgedit.durable import write_json_atomic
    from forgedit.images import contact_sheet, image_file_name, write_png_atomic

    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidInputError(
            f"--out {os.fspath(out)!r} exists and is not an empty directory", field="out"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        rows: list[dict[str, Any]] = []
        pairs_json = []
        for p in report.pairs:
            files = []
            for scored in p.outputs:
                params = scored.output.params
                name = image_file_name(
                    scored.output.index,
                    params["forget"],
                    params["interpolation"],
                    params["gamma"],
                    params["alpha"],
                    params["seed"],
                )
                (tmp / "images" / p.pair.pair_id).mkdir(parents=True, exist_ok=True)
                write_png_atomic(scored.output.image, tmp / "images" / p.pair.pair_id / name)
                files.append(f"images/{p.pair.pair_id}/{name}")
                rows.append(
                    {
                        "pair": p.pair.pair_id,
                        "img_name": p.pair.img_name,
                        "target_text": p.pair.target_text,
                        "source_text": p.direction_source,
                        "file": files[-1],
                        **params,
                        **scored.scores,
                        "best": scored is p.outputs[p.best],
                    }
                )
            tiles = [(s.output.image, _tile_label(s, i == p.best)) for i, s in enumerate(p.outputs)]
            (tmp / "sheets").mkdir(exist_ok=True)
            write_png_atomic(
                contact_sheet(p.input_image, tiles), tmp / "sheets" / f"{p.pair.pair_id}.png"
            )
            pairs_json.append(
                {
                    "pair": p.pair.pair_id,
                    "img_name": p.pair.img_name,
                    "target_text": p.pair.target_text,
                    "source_text": p.pair.source_text,
                    "source_prompt": p.edit.source_prompt,
                    "edit_model_id": p.edit.edit_model_id,
                    "seconds": round(p.edit.seconds, 3),
                    "best": files[p.best],
                    "best_scores": p.best_scores,
                    "outputs": [
                        {"file": f, **s.output.params, **s.scores}
                        for f, s in zip(files, p.outputs, strict=True)
                    ],
                }
            )
        write_json_atomic(
            tmp / "scores.json",
            {
                "dataset": report.dataset,
                "editor": report.editor,
                "base_model": report.base_model,
                "options": {
                    "mode": report.options.mode,
                    "forget": report.options.forget,
                    "gammas": report.options.gammas,
                    "seeds": report.options.seeds,
                    "use_source_text": report.options.use_source_text,
                },
                "scorers": {
                    "clip": report.scorers.clip_name,
                    "lpips": report.scorers.lpips_name,
                },
                "best_rule": BEST_RULE,
                "summary": report.summary(),
                "pairs": pairs_json,
            },
        )
        with open(tmp / "scores.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["pair"])
            writer.writeheader()
            writer.writerows(rows)
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _tile_label(scored: ScoredOutput, best: bool) -> str:
    p, s = scored.output.params, scored.scores
    symbol = "β" if p["interpolation"] == "vp" else "γ"
    label = f"{p['forget']} {symbol}={p['gamma']:g} seed={p['seed']}"
    label += f" clip={s['clip_score']:.2f} dir={s['clip_direction']:.2f} ssim={s['ssim']:.2f}"
    if s.get("lpips") is not None:
        label += f" lpips={s['lpips']:.2f}"
    return ("BEST " if best else "") + label
