"""What ``edit`` leaves in --out: files staged in a hidden directory and moved into place
only when the whole sweep is written, and the human-readable report on stdout."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import TextIO

from forgedit.durable import JsonObject, fsync_dir, write_bytes_atomic

CONTACT_SHEET_STEM = "contact_sheet"  # + the encoding's suffix: contact_sheet.png by default
SUMMARY = "summary.json"


class StagedOutput:
    """Files of one run, written into a hidden staging directory inside ``out`` and moved
    into ``out`` by ``commit``. ``abort`` removes everything this run wrote, including ``out``
    itself (and parents) if this run created them."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self._created = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".forgedit-", suffix=".partial", dir=out))
        self._moved: list[Path] = []

    def write(self, name: str, data: bytes) -> None:
        """Stage one file (durably: ``forgedit.durable``). A name is written once per run."""
        path = self.staging / name
        if path.exists():
            raise FileExistsError(errno.EEXIST, "two results of this run have one file name")
        write_bytes_atomic(data, path)

    def commit(self) -> None:
        for item in sorted(self.staging.iterdir()):
            target = self.out / item.name
            os.replace(item, target)
            self._moved.append(target)
        self.staging.rmdir()
        fsync_dir(self.out)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        for target in self._moved:
            target.unlink(missing_ok=True)
        for directory in self._created:  # innermost first
            try:
                directory.rmdir()
            except OSError:
                break


def display_path(out: Path, name: str) -> str:
    """How a result is named in the summary: inside --out, as the user spelled --out."""
    return os.fspath(out / name)


def print_human(summary: JsonObject, stream: TextIO) -> None:
    """The summary for a person reading a terminal (``--json`` prints it whole)."""
    print(f"source prompt: {summary['source_prompt']}", file=stream)
    print(
        f"train seed: {summary['train_seed']}   sampling seeds: "
        f"{','.join(map(str, summary['seeds']))}",
        file=stream,
    )
    for image in summary["images"]:
        print(image["path"], file=stream)
    print(f"contact sheet: {summary['contact_sheet']}", file=stream)
    print(f"summary: {summary['summary']}", file=stream)
    if summary["edit_model"]:
        print(f"edit model: {summary['edit_model']}", file=stream)
    timings = "  ".join(f"{k} {v:.1f}s" for k, v in summary["timings"].items())
    print(f"timings: {timings}", file=stream)
