"""The `hf-r2` command line: [`main`] registers the sub-commands of [`hf_r2.commands`] and runs one.

`hf-r2 train`, `hf-r2 demo`, `hf-r2 ptq`, `hf-r2 qat`, `hf-r2 compress`, `hf-r2 evaluate`, `hf-r2 export`,
`hf-r2 reproduce`, `hf-r2 push`, `hf-r2 download`, `hf-r2 env` (also `python -m hf_r2 ...`). Nothing imports this
module: the library code lives in the rest of the package.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from ._utils import UsageError
from .checkpoints import Terminated, interrupt_exit_code, sigterm_as_interrupt
from .commands.env import env_command_parser
from .commands.export import export_command_parser
from .commands.hub import download_command_parser, push_command_parser
from .commands.parsing import one_line_errors, unknown_flags_message
from .commands.quant import (
    compress_command_parser,
    evaluate_command_parser,
    ptq_command_parser,
    qat_command_parser,
)
from .commands.reproduce import demo_command_parser, reproduce_command_parser
from .commands.train import train_command_parser

__all__ = ["main"]


#: The kinds of exception that can be the user's mistake (a path, a value, a damaged file); see [`_is_user_error`].
USER_ERRORS = (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _is_user_error(err: BaseException) -> bool:
    """A user's mistake, printed as one line: a [`UsageError`], an error hf-r2 raised on purpose (the innermost frame
    is a `raise` statement in hf-r2's own code, with a message written for the user), or a file the user named that
    cannot be opened. Anything else (a ValueError deep in torch, an unpacking error in hf-r2) is a bug and keeps its
    traceback."""
    import linecache

    if isinstance(err, UsageError):
        return True
    if isinstance(err, OSError) and err.filename:
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    return filename.startswith(_PACKAGE) and linecache.getline(filename, tb.tb_lineno).strip().startswith("raise")


def _debug(flag: bool) -> bool:
    return flag or os.environ.get("HF_R2_DEBUG", "").lower() not in ("", "0", "false")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-r2` console script; returns the exit status.

    A mistake of the user's (a bad flag or value, a missing or damaged file: see [`_is_user_error`]) is one line,
    `hf-r2 <cmd>: error: ...`, and a non-zero status (`SystemExit(2)` for a bad flag, as argparse; 1 for the rest);
    other exceptions keep their traceback. `hf-r2 --debug <cmd>` (before the command) or `HF_R2_DEBUG=1` shows the
    traceback of user errors too. Ctrl-C is one line and status 130; SIGTERM (a cluster scheduler's stop) is
    handled as Ctrl-C ([`~hf_r2.checkpoints.sigterm_as_interrupt`]), with status 143.
    """
    parser = one_line_errors(argparse.ArgumentParser(
        prog="hf-r2", description="R2-Loss training for timm and Hugging Face vision models."
    ))
    parser.add_argument("--debug", action="store_true",
                        help="Show the traceback of errors too (also: HF_R2_DEBUG=1).")
    subparsers = parser.add_subparsers(
        dest="command", metavar="{train,demo,ptq,qat,compress,evaluate,export,reproduce,push,download,env}",
        title="commands",
    )
    for add in (train_command_parser, demo_command_parser, ptq_command_parser, qat_command_parser,
                compress_command_parser, evaluate_command_parser, export_command_parser, reproduce_command_parser,
                push_command_parser, download_command_parser, env_command_parser):
        one_line_errors(add(subparsers))
    args, debug = None, False
    try:
        args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
        debug = vars(args).pop("debug", False)  # the commands see only their own flags
        if not hasattr(args, "func"):
            parser.print_help()
            return 1
        if extra and not getattr(args, "takes_extra_args", False):
            sub = subparsers.choices[args.command]
            raise UsageError(unknown_flags_message(
                extra, [o for action in sub._actions for o in action.option_strings], sub.prog), prog=sub.prog)
        args.extra_args = extra
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.WARNING)
        logging.getLogger("hf_r2").setLevel(logging.INFO)
        with sigterm_as_interrupt() as terminated:
            code = int(args.func(args) or 0)
        # a command that says itself where to resume (hf-r2 train) returns Ctrl-C's status: SIGTERM's is 143
        return Terminated.exit_code if terminated and code == interrupt_exit_code(KeyboardInterrupt()) else code
    except KeyboardInterrupt as err:  # `hf-r2 train` says where to resume; the other commands keep what they finished
        if _debug(debug):
            raise
        command = f"hf-r2 {args.command}" if getattr(args, "command", None) else "hf-r2"
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"{command}: {what} (finished rows and trainings are kept; run it again to continue)", file=sys.stderr)
        return interrupt_exit_code(err)
    except USER_ERRORS as err:
        if _debug(debug) or not _is_user_error(err):
            raise
        prog = getattr(err, "prog", None) or (f"hf-r2 {args.command}" if getattr(args, "command", None) else "hf-r2")
        message = str(err).strip() or type(err).__name__
        if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
        if isinstance(err, UsageError):  # a bad flag: status 2, as argparse's own errors
            raise SystemExit(2) from None
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
