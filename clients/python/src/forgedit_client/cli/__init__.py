"""``forgedit``: the command line of the Forgedit service (``forgedit --help``).

Output contract: results go to stdout (human lines, or one JSON document with ``--json``);
progress, milestones and errors go to stderr. An error is one line,
``forgedit: error: CODE: message [field: problem]``. Exit status: 0 success, 2 invalid input
(INVALID_ARGUMENT, a bad flag, an unreadable image), 130 interrupted (the job is cancelled on
the server first unless ``--detach``), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from forgedit_client.channel import TlsConfig
from forgedit_client.cli.parser import PROG, build_parser
from forgedit_client.cli.progress import ProgressDisplay
from forgedit_client.cli.sheet import contact_sheet
from forgedit_client.client import _UNSET, ForgeditClient
from forgedit_client.errors import ForgeditClientError, ForgeditRpcError, InvalidOptionError
from forgedit_client.events import ImageReady, Preview
from forgedit_client.files import write_atomic
from forgedit_client.options import image_bytes
from forgedit_client.results import JobResult
from forgedit_client.stream import EventStream

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (the console script exits with it)."""
    args = build_parser().parse_args(argv)
    try:
        with _client(args) as client:
            return _dispatch(client, args)
    except InvalidOptionError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except ForgeditRpcError as exc:
        code = EXIT_USAGE if exc.code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_ERROR
        return _fail(exc.one_line(), code)
    except ForgeditClientError as exc:
        return _fail(str(exc), EXIT_ERROR)
    except KeyboardInterrupt:  # before a job existed (connecting, reading the image)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # unreadable CA file, unwritable --out, …
        return _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), EXIT_ERROR)


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _client(args: argparse.Namespace) -> ForgeditClient:
    tls: bool | TlsConfig = False
    if args.tls or args.ca or args.cert or args.key:
        if bool(args.cert) != bool(args.key):
            raise InvalidOptionError("mutual TLS needs both --cert and --key")
        tls = TlsConfig.from_files(args.ca, args.cert, args.key)
    return ForgeditClient(
        args.server, token=args.token, tls=tls, load_balancing=args.load_balancing
    )


def _dispatch(client: ForgeditClient, args: argparse.Namespace) -> int:
    if args.command in ("edit", "sample"):
        return _run_job(client, args)
    if args.command == "models":
        return _models(client, args)
    if args.command == "jobs":
        return _jobs(client, args)
    raise AssertionError(args.command)  # argparse rejects unknown commands


# ------------------------------------------------------------------------------ job streams


def job_options(args: argparse.Namespace) -> dict[str, Any]:
    """The SDK keyword options a parsed ``edit``/``sample`` command line asks for (unset flags
    are left out, so the server's defaults apply)."""
    names = [
        "interpolation",
        "gammas",
        "alphas",
        "forget",
        "forget_degree",
        "seeds",
        "seed_count",
        "steps",
        "guidance",
        "image_format",
        "image_quality",
        "x0_every",
    ]
    if args.command == "edit":
        names += ["mode", "train_seed", "vae_seed", "precision", "delta_format"]
    options = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "no_preview", False):
        options["training_free_preview"] = False
    if options.get("train_seed") == "random":
        del options["train_seed"]
        options["fresh_seed"] = True
    for flag in ("updates", "batch_size"):  # one value per stage, as the engine CLI
        values = getattr(args, flag, None) or []
        for name, value in zip((flag, f"stage2_{flag}"), values, strict=False):
            options[name] = value
    if getattr(args, "size", None) is not None:
        options["width"], options["height"] = args.size
    return options


def _run_job(client: ForgeditClient, args: argparse.Namespace) -> int:
    timeout = _UNSET if args.timeout is None else args.timeout
    source: bytes | None = None
    if args.command == "edit":
        source = image_bytes(args.image)
        stream = client.edit(
            source,
            args.prompts,
            source_prompt=args.source_prompt,
            base_model=args.base_model,
            request_id=args.request_id,
            detach=args.detach,
            timeout=timeout,
            **job_options(args),
        )
    else:
        stream = client.sample(
            args.edit_model_id,
            args.prompts,
            request_id=args.request_id,
            detach=args.detach,
            timeout=timeout,
            **job_options(args),
        )
    return _follow(client, stream, args, out=Path(args.out), source=source, detach=args.detach)


def _follow(
    client: ForgeditClient,
    stream: EventStream,
    args: argparse.Namespace,
    *,
    out: Path | None,
    source: bytes | None,
    detach: bool,
) -> int:
    """Show progress, write images as they arrive, then the sheet and the summary."""
    display = ProgressDisplay(quiet=args.quiet)
    writer = ImageWriter(out) if out is not None else None
    try:
        for event in stream:
            display.show(event)
            if writer is not None and isinstance(event, ImageReady):
                writer.write(event)
            elif writer is not None and isinstance(event, Preview):
                writer.write_preview(event)
        result = stream.result()
    except KeyboardInterrupt:
        display.close()
        return _interrupted(client, stream, detach=detach)
    finally:
        display.close()
    summary = result.to_dict()
    if writer is not None:
        summary["files"] = writer.files
        if writer.preview is not None:
            summary["preview"] = writer.preview
        writer.write_manifest(summary)
        if result.images and not getattr(args, "no_sheet", False):
            sheet = writer.write_sheet(result, source)
            summary["contact_sheet"] = str(sheet)
    if stream.gaps:
        display.say(f"warning: {stream.gaps} events were lost while re-attaching")
    _print_summary(summary, args, out)
    return EXIT_OK


def _interrupted(client: ForgeditClient, stream: EventStream, *, detach: bool) -> int:
    job = stream.job_id
    if detach:
        where = f"job {job}" if job else f"request {stream.request_id}"
        print(
            f"{PROG}: interrupted; {where} keeps running on the server. Re-attach with: "
            f"{PROG} jobs watch " + (job or f"--request-id {stream.request_id}"),
            file=sys.stderr,
        )
    else:
        stream.cancel()  # CancelJob by id (best effort), then close the call
        print(f"{PROG}: interrupted; asked the server to cancel job {job or '?'}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _print_summary(summary: dict[str, Any], args: argparse.Namespace, out: Path | None) -> None:
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return
    if summary.get("edit_model_id"):
        print(f"edit model: {summary['edit_model_id']}")
    if summary.get("source_prompt"):
        print(f"source prompt: {summary['source_prompt']}")
    n = len(summary.get("images", []))
    print(f"images: {n}" + (f" in {out}" if out is not None and n else ""))
    if summary.get("contact_sheet"):
        print(f"contact sheet: {summary['contact_sheet']}")


_UNSAFE = re.compile(r"[^A-Za-z0-9+._-]+")


def image_filename(event: ImageReady) -> str:
    """A stable, filesystem-safe name that says what the image is, e.g.
    ``003-encoderkv-g0.6-seed1.png`` (vp: ``b1.2-a0.9``; ``.webp``/``.jpg`` by its format).
    Prompts are left to results.json."""
    p = event.params
    forget = _UNSAFE.sub("_", p.forget)[:60] or "default"
    sweep = f"b{p.gamma:g}-a{p.alpha:g}" if p.interpolation == "vp" else f"g{p.gamma:g}"
    return f"{event.index:03d}-{forget}-{sweep}-seed{p.seed}{event.suffix}"


def preview_filename(event: Preview) -> str:
    """``preview.png`` for the training-free preview, ``previews/x0-003.png`` for image 3's
    x0 previews (each replaces the last: the folder shows the latest); suffix by format."""
    if event.kind == "x0":
        return f"previews/x0-{event.index:03d}{event.suffix}"
    return f"preview{event.suffix}"


class ImageWriter:
    """Writes each image atomically into ``out`` as it arrives (and each preview, replacing
    the previous one of the same image), then ``results.json`` and ``contact_sheet.png``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.files: dict[str, str] = {}  # sweep index -> file name
        self.preview: str | None = None  # the training-free preview's file name
        out.mkdir(parents=True, exist_ok=True)

    def write(self, event: ImageReady) -> Path:
        path = event.save(self.out / image_filename(event))
        self.files[str(event.index)] = path.name
        return path

    def write_preview(self, event: Preview) -> Path | None:
        """Write a preview; one of a kind this CLI does not know is skipped."""
        if event.kind not in ("training_free", "x0"):
            return None
        name = preview_filename(event)
        path = event.save(self.out / name)
        if event.kind == "training_free":
            self.preview = name
        return path

    def write_manifest(self, summary: dict[str, Any]) -> Path:
        data = json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n"
        return write_atomic(self.out / "results.json", data)

    def write_sheet(self, result: JobResult, source: bytes | None) -> Path:
        images = sorted(result.images, key=lambda i: i.index)
        several_prompts = len({i.params.prompt for i in images}) > 1
        tiles = [(source, "input")] if source is not None else []
        for i in images:
            label = i.params.label()
            if several_prompts:
                label = f"{i.params.prompt[:40]} · {label}"
            tiles.append((i.data, label))
        return write_atomic(self.out / "contact_sheet.png", contact_sheet(tiles))


# ------------------------------------------------------------------------- models and jobs


def _models(client: ForgeditClient, args: argparse.Namespace) -> int:
    if args.models_command == "list":
        models = []
        for m in client.list_edit_models(
            base_model=args.base_model, image_sha256=args.image_sha256
        ):
            models.append(m)
            if args.limit and len(models) >= args.limit:
                break
        if args.json:
            print(json.dumps([m.to_dict() for m in models], indent=2, sort_keys=True))
        else:
            for m in models:
                created = m.create_time.strftime("%Y-%m-%d %H:%M") if m.create_time else "-"
                size = f"{m.width}x{m.height}" if m.width and m.height else "-"
                print(
                    f"{m.edit_model_id}  {m.base_model}  {m.training_mode or '-'}  "
                    f"{size}  {created}  {m.source_prompt}"
                )
        return EXIT_OK
    if args.models_command == "show":
        m = client.get_edit_model(args.edit_model_id)
        _print_record(m.to_dict(), args)
        return EXIT_OK
    client.delete_edit_model(args.edit_model_id)
    _print_record({"deleted": args.edit_model_id}, args)
    return EXIT_OK


def _jobs(client: ForgeditClient, args: argparse.Namespace) -> int:
    if args.jobs_command == "watch":
        if bool(args.job_id) == bool(args.request_id):
            raise InvalidOptionError("give a JOB_ID or --request-id (exactly one)")
        timeout = _UNSET if args.timeout is None else args.timeout
        stream = client.watch_job(args.job_id, request_id=args.request_id, timeout=timeout)
        # Watching never cancels: Ctrl-C just stops watching (as --detach).
        out = Path(args.out) if args.out else None
        return _follow(client, stream, args, out=out, source=None, detach=True)
    if args.jobs_command == "show":
        _print_record(client.get_job(args.job_id).to_dict(), args)
        return EXIT_OK
    _print_record(client.cancel_job(args.job_id).to_dict(), args)
    return EXIT_OK


def _print_record(record: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(record, indent=2, sort_keys=True))
        return
    width = max(len(k) for k in record)
    for key, value in record.items():
        if key == "training_config_json":
            continue
        print(f"{key:<{width}}  {value}")
