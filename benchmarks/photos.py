"""Which photo a benchmark edits.

By default the repository's own sample photo (``samples/photos/cat.jpg``, CC0), so a clone with
nothing beside it can run every benchmark. TEdBench, the benchmark the paper reports on, is an
input the user points at with ``--tedbench DIR`` (the folder holding ``originals/``); the
benchmark then edits the TEdBench photo its earlier recorded figures used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_PHOTO = REPO / "samples" / "photos" / "cat.jpg"


def add_photo_arguments(parser: argparse.ArgumentParser, tedbench_photo: str) -> None:
    """``--photo PATH`` and ``--tedbench DIR`` (mutually exclusive)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--photo", type=Path, default=None, help=f"photo to edit (default: {SAMPLE_PHOTO.name})"
    )
    group.add_argument(
        "--tedbench",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"a TEdBench checkout (DIR/originals/): edit its {tedbench_photo}",
    )
    parser.set_defaults(tedbench_photo=tedbench_photo)


def chosen_photo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """The photo the arguments name; a missing file is a usage error naming what was looked for."""
    if args.tedbench is not None:
        path = args.tedbench / "originals" / args.tedbench_photo
    else:
        path = args.photo or SAMPLE_PHOTO
    if not path.is_file():
        parser.error(f"no photo at {path} (--tedbench wants the folder that holds originals/)")
    return path.resolve()
