"""The `hf-r2` command line: [`main`] registers the sub-commands of [`hf_r2.commands`] and runs one.

`hf-r2 train`, `hf-r2 demo`, `hf-r2 ptq`, `hf-r2 qat`, `hf-r2 compress`, `hf-r2 evaluate`, `hf-r2 reproduce`,
`hf-r2 push`, `hf-r2 download`, `hf-r2 env` (also `python -m hf_r2 ...`). Nothing imports this module: the library
code lives in the rest of the package.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .commands.env import env_command_parser
from .commands.hub import download_command_parser, push_command_parser
from .commands.quant import (
    compress_command_parser,
    evaluate_command_parser,
    ptq_command_parser,
    qat_command_parser,
)
from .commands.reproduce import demo_command_parser, reproduce_command_parser
from .commands.train import train_command_parser

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `hf-r2` console script; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="hf-r2", description="R2-Loss training for timm and Hugging Face vision models."
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="{train,demo,ptq,qat,compress,evaluate,reproduce,push,download,env}", title="commands"
    )
    train_command_parser(subparsers)
    demo_command_parser(subparsers)
    ptq_command_parser(subparsers)
    qat_command_parser(subparsers)
    compress_command_parser(subparsers)
    evaluate_command_parser(subparsers)
    reproduce_command_parser(subparsers)
    push_command_parser(subparsers)
    download_command_parser(subparsers)
    env_command_parser(subparsers)
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if not hasattr(args, "func"):
        parser.print_help()
        return 1
    if extra and not getattr(args, "takes_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.WARNING)
    logging.getLogger("hf_r2").setLevel(logging.INFO)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
