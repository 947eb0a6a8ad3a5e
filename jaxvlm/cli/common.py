"""What the three tools share: --debug, user errors as one line on stderr, and logs that keep clear of tqdm's bars."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable

# Errors a user can act on (a wrong path, a bad value, a refused overwrite, no network): one line, no traceback.
# Anything else is a bug in jaxvlm and keeps its traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, FileExistsError, PermissionError, ConnectionError,
               ValueError, NotImplementedError)

EXIT_USER_ERROR = 2  # argparse's code for a usage error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def add_debug_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--debug", action="store_true",
                    help="show every library's INFO logs, and the full traceback of an error")


def check_adapter_dir(path: str) -> None:
    """Raises FileNotFoundError unless the --adapter directory exists, before minutes go into loading a model."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--adapter {path}: no such directory")


def run_tool(prog: str, body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """body(args)'s exit code, with the tool's logging set up around it.

    A user error prints `<prog>: error: <message>` on stderr and returns 2 (Ctrl-C: 'interrupted', 130);
    with args.debug it is re-raised instead. Every tool joins a multi-host run first when the environment
    describes one (jaxvlm.sharding.initialize_distributed: one command per host).
    """
    try:
        with tool_logging(args.debug):
            from jaxvlm.sharding import initialize_distributed
            initialize_distributed()
            return body(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"{prog}: error: {error_message(e)}", file=sys.stderr)
        return EXIT_USER_ERROR


def error_message(e: BaseException) -> str:
    """The error as one line: `path: reason` for an OSError from the OS, else its text with newlines folded."""
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__


class _TqdmHandler(logging.Handler):
    """Writes each record on stderr through tqdm.write, which lifts any progress bar above it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _jaxvlm_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name == "jaxvlm" or record.name.startswith("jaxvlm.")


@contextlib.contextmanager
def tool_logging(debug: bool):
    """Logs on stderr above tqdm's bars for the duration: jaxvlm's INFO lines and every library's warnings,
    or, with `debug`, every INFO line.

    Without `debug` this also hides transformers' advisories ("PyTorch was not found..."), which it
    emits while being imported: the tools import it inside this block.
    """
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    if not debug:
        handler.addFilter(_jaxvlm_or_warning)  # absl, jax and orbax log INFO lines a user has no use for
    root, ours = logging.getLogger(), logging.getLogger("jaxvlm")
    saved_levels = root.level, ours.level
    saved_advisory = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    root.setLevel(logging.INFO if debug else logging.WARNING)
    ours.setLevel(logging.INFO)
    root.addHandler(handler)
    if not debug:
        os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_levels[0])
        ours.setLevel(saved_levels[1])
        if saved_advisory is None:
            os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = saved_advisory
