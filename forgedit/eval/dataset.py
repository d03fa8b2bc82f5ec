"""A benchmark folder in TEdBench's layout: ``originals/`` and ``input_list.json``.

``input_list.json`` is a JSON list of ``{"img_name": "bird.jpeg", "target_text": "A photo
of a bird spreading wings."}``, with an optional ``"source_text"`` describing the original
(used for CLIP directional similarity; without it the edit's source prompt stands in). The
same image may appear in several pairs. ``write_shapes_dataset`` writes the toy world's
held-out edits in this layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from forgedit.config import check_prompt
from forgedit.errors import InvalidInputError

INPUT_LIST = "input_list.json"
ORIGINALS = "originals"
LAYOUT = (
    "a TEdBench-layout folder: originals/ with the images and input_list.json, a JSON list of "
    '{"img_name": FILE in originals/, "target_text": TEXT} with an optional "source_text"'
)


@dataclass(frozen=True)
class Pair:
    """One benchmark edit: an image of ``originals/`` and the text to edit it toward."""

    index: int
    img_name: str
    target_text: str
    source_text: str | None
    path: Path

    @property
    def pair_id(self) -> str:
        """A file-name-safe id, unique in the dataset: ``003-bird``."""
        from forgedit.images import slug

        return f"{self.index:03d}-{slug(Path(self.img_name).stem, 24)}"


def read_dataset(directory: str | os.PathLike[str]) -> list[Pair]:
    """Read and check a TEdBench-layout folder; ``InvalidInputError`` names the first
    problem (missing folder or file, malformed entry, unsafe image name)."""
    root, shown = Path(directory), os.fspath(directory)
    if not root.is_dir():
        raise InvalidInputError(f"dataset {shown!r} is not a directory; expected {LAYOUT}")
    list_path = root / INPUT_LIST
    if not list_path.is_file() or not (root / ORIGINALS).is_dir():
        raise InvalidInputError(
            f"dataset {shown!r} has no {INPUT_LIST} or {ORIGINALS}/; expected {LAYOUT}"
        )
    try:
        entries = json.loads(list_path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise InvalidInputError(f"{shown}/{INPUT_LIST} is not readable JSON ({err})") from err
    if not isinstance(entries, list) or not entries:
        raise InvalidInputError(f"{shown}/{INPUT_LIST} must be a non-empty JSON list; {LAYOUT}")
    pairs = []
    for index, entry in enumerate(entries):
        where = f"{shown}/{INPUT_LIST} entry {index}"
        if not isinstance(entry, dict):
            raise InvalidInputError(f"{where} is not an object; {LAYOUT}")
        name, target = entry.get("img_name"), entry.get("target_text")
        source = entry.get("source_text")
        if not isinstance(name, str) or not isinstance(target, str):
            raise InvalidInputError(f"{where} needs string img_name and target_text; {LAYOUT}")
        if source is not None and not isinstance(source, str):
            raise InvalidInputError(f"{where}: source_text must be a string when given")
        if Path(name).name != name or name in ("", ".", ".."):
            raise InvalidInputError(f"{where}: img_name {name!r} must be a file name in originals/")
        check_prompt(target, f"{where} target_text")
        if source is not None:
            check_prompt(source, f"{where} source_text")
        path = root / ORIGINALS / name
        if not path.is_file():
            raise InvalidInputError(f"{where}: {ORIGINALS}/{name} does not exist")
        pairs.append(Pair(index, name, target, source, path))
    return pairs


def write_shapes_dataset(directory: str | os.PathLike[str], per_kind: int) -> list[Pair]:
    """The toy world's held-out edits (``per_kind`` colour, shape and background edits, in
    that order) as a TEdBench-layout folder at ``directory`` (new or empty), with
    ``source_text`` = the true caption. Returns its pairs."""
    from forgedit.durable import write_json_atomic
    from forgedit.zoo.shapes import world

    root = Path(directory)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise InvalidInputError(f"{os.fspath(directory)!r} exists and is not an empty directory")
    (root / ORIGINALS).mkdir(parents=True, exist_ok=True)
    entries = []
    for kind in world.EDIT_KINDS:
        for i in range(per_kind):
            case = world.edit_case(kind, i)
            name = f"{kind}-{i:03d}.png"
            case.source.render().save(root / ORIGINALS / name)
            entries.append(
                {
                    "img_name": name,
                    "target_text": case.target_prompt,
                    "source_text": case.source_prompt,
                    "edit": kind,
                }
            )
    write_json_atomic(root / INPUT_LIST, entries)
    return read_dataset(root)
