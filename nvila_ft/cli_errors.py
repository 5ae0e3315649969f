"""User errors on the command line: one message naming the file, row or key and the fix, exit code 2, no
traceback (`NVILA_FT_DEBUG=1` shows it). Every `python -m nvila_ft.*` entry point goes through `user_errors`.

    @user_errors
    def main(argv=None) -> int: ...
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

USAGE_EXIT = 2  # like argparse: the command was given something it cannot use
DEBUG_ENV = "NVILA_FT_DEBUG"


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "fix your input", not "the kit is broken" (imported late: they live all over)."""
    from nvila_ft.data.rows import DataError
    from nvila_ft.model.processing import SampleTooLongError
    from nvila_ft.model.video import VideoError
    from nvila_ft.train.checkpoints import RunStateError
    from nvila_ft.train.recipe import RecipeError

    types: list[type[BaseException]] = [RecipeError, DataError, SampleTooLongError, VideoError, RunStateError,
                                        FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError]
    for module, name in (("nvila_ft.inference", "RunError"), ("nvila_ft.merge", "MergeError"),
                         ("nvila_ft.predict", "OutputFileError")):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def message(err: BaseException) -> str:
    """The error's own text without chained library detail past its first blank line."""
    text = str(err).strip() or type(err).__name__
    if isinstance(err, (FileNotFoundError, PermissionError)) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text


def user_errors(main: Callable[..., int]) -> Callable[..., int]:
    """Wraps a CLI `main(argv) -> int`: user errors print `error: ...` on stderr and return 2; Ctrl-C returns 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            if debug:
                raise
            print("interrupted", file=sys.stderr)
            return 130
        except _user_error_types() as err:
            if debug:
                raise
            print(f"error: {message(err)}", file=sys.stderr)
            return USAGE_EXIT

    return wrapper
