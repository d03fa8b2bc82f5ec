"""``python -m forgedit``: run one command and turn every outcome into an exit status and, for
a failure, one line on stderr (``main``)."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

from forgedit.cli.arguments import check_edit_args
from forgedit.cli.commands import (
    run_build_engine,
    run_make_random_model,
    run_make_tiny_model,
    run_strategies,
)
from forgedit.cli.edit import one_line, run_edit
from forgedit.cli.evaluate import run_eval
from forgedit.cli.output import print_human
from forgedit.cli.parser import UsageError, build_parser, in_flags
from forgedit.errors import CancelledError, ForgeditError
from forgedit.events import CancelToken

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _quiet_libraries() -> None:
    """Keep stderr for our own progress bars: no per-file loading bars or backend notices
    from diffusers and transformers (errors still show)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


@contextlib.contextmanager
def _sigint_cancels(cancel: CancelToken) -> Iterator[None]:
    """First Ctrl-C: cancel at the next step. Second: KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel("interrupted")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: Sequence[str] | None = None, *, cancel: CancelToken | None = None) -> int:
    """Run one command; return the exit status (0 ok, 2 bad input, 130 interrupted, 1 failed).

    ``cancel`` lets a caller (or a test) cancel a running ``edit`` as Ctrl-C would.
    """
    stdout, stderr = sys.stdout, sys.stderr
    cancel = cancel or CancelToken()
    try:
        args = build_parser().parse_args(argv)
        if args.command == "edit":
            command = check_edit_args(args)
            _quiet_libraries()
            with _sigint_cancels(cancel):
                summary = run_edit(command, cancel, stderr)
            if command.json:
                print(json.dumps(summary, indent=2, ensure_ascii=False), file=stdout)
            else:
                print_human(summary, stdout)
        elif args.command == "strategies":
            _quiet_libraries()
            run_strategies(args, stdout)
        elif args.command == "make-tiny-model":
            _quiet_libraries()
            run_make_tiny_model(args, stdout)
        elif args.command == "make-random-model":
            _quiet_libraries()
            run_make_random_model(args, stdout)
        elif args.command == "eval":
            _quiet_libraries()
            run_eval(args, stdout, stderr)
        elif args.command == "build-engine":
            _quiet_libraries()
            run_build_engine(args, stdout)
        return EXIT_OK
    except SystemExit as e:  # --help
        return int(e.code or 0) if isinstance(e.code, int | None) else EXIT_USAGE
    except (CancelledError, KeyboardInterrupt):
        print("error: interrupted; nothing was written to the output directory", file=stderr)
        return EXIT_INTERRUPTED
    except (ForgeditError, UsageError) as e:
        print(f"error: {one_line(in_flags(str(e)))}", file=stderr)
        return EXIT_USAGE
    except OSError as e:  # disk full, permissions changed mid-run, ...: no paths in the message
        print(
            f"error: {e.strerror or type(e).__name__}; nothing was written to the output directory",
            file=stderr,
        )
        return EXIT_FAILURE
