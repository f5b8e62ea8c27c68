"""`hf-r2 env`: the versions and machine facts ([`hf_r2._utils.machine_info`]) to paste into a bug report."""

from __future__ import annotations

import argparse

__all__ = ["env_command_parser", "env_command"]


def env_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """The `env` sub-command: versions for bug reports."""
    description = "Print the versions of hf-r2, Python, the platform and the libraries it uses, for bug reports."
    if subparsers is None:
        parser = argparse.ArgumentParser("hf-r2 env", description=description)
    else:
        parser = subparsers.add_parser("env", description=description, help=description)
    parser.set_defaults(func=env_command)
    return parser


def env_command(args: argparse.Namespace) -> int:
    from .._utils import machine_info

    print("\nCopy-and-paste the text below in your GitHub issue\n")
    print("\n".join(f"- `{key}`: {value}" for key, value in machine_info().items()))
    return 0
