"""User-facing errors: every entry point turns these into one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import os
import re
import sys
from typing import Callable, NoReturn, Sequence

log = logging.getLogger("pipeline")


# ANSI CSI sequences (colours), other ESC sequences, and control characters except \t and \n
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def strip_escapes(text: str) -> str:
    """``text`` without terminal escape sequences and control characters other than tab and newline."""
    return _ESCAPES.sub("", str(text))


def one_line(text: str, limit: int | None = None) -> str:
    """``text`` as one clean line: terminal escapes and control characters removed, whitespace runs collapsed, and
    with ``limit`` cut at a word boundary (``...`` appended) rather than mid-word. For messages that quote another
    library's error (torch's carry ANSI colour codes and tabs)."""
    line = " ".join(strip_escapes(text).split())
    if limit is None or len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] if " " in line[:limit] else line[:limit]
    return cut.rstrip(" ,;:") + " ..."


class UsageError(Exception):
    """Bad input from the user (unknown name, wrong path, mismatched bank, bad config key).

    The message is a single line; entry points print it and exit with code 2 (or the subclass's ``exit_code``).
    """


class BankError(UsageError):
    """A label bank is missing, incomplete, corrupt or does not match the dataset."""


class NotABankError(BankError):
    """The path holds no label bank: nothing there, or a folder a dump did not write (never "damaged")."""


class CliParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the entry points' error contract: a bad flag or value is one line on
    stderr (``PROG: error: MESSAGE (see --help)``, no usage block) and exit code 2 (SystemExit, as argparse);
    a misspelt flag names the closest real one. Subcommand parsers inherit it."""

    def error(self, message: str) -> NoReturn:
        m = re.fullmatch(r"unrecognized arguments: (.*)", message)
        if m:
            flags = [s for a in self._actions for s in a.option_strings]
            for arg in m.group(1).split():
                close = difflib.get_close_matches(arg.split("=")[0], flags, n=1) if arg.startswith("-") else []
                if close:
                    message += f"; did you mean {close[0]}?"
                    break
        message = " ".join(message.splitlines())
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def setup_logging(verbose: bool = False, rank: int = 0) -> None:
    """Configure root logging once for an entry point (libraries only use ``logging.getLogger``). Under torchrun
    only rank 0 logs at INFO; the other ranks log warnings and errors (prefixed with their rank), and every rank
    logs everything with ``verbose``."""
    level = logging.DEBUG if verbose else logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else
        f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def cli_entry(fn: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap ``main(argv)``: UsageError -> one line on stderr, return 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        try:
            return fn(argv)
        except UsageError as e:
            msg = " ".join(strip_escapes(str(e)).splitlines())  # \r, \u2028, escapes must not break the line
            print(f"error: {msg}", file=sys.stderr)
            return int(getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `... | head` closed stdout: not an error of ours, and no traceback
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: let that go nowhere
            return 0

    return wrapper
