"""One-line command-line errors: [`one_line_errors`] makes a parser (argparse's or transformers' `HfArgumentParser`)
report a bad flag as a [`~hf_r2._utils.UsageError`] of one line, with the closest valid flag for a typo
(`--r2_wieght` -> "did you mean --r2_weight?"), instead of printing its whole usage; `hf_r2.cli.main` prints it."""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import types
from collections.abc import Iterable

from .._utils import UsageError

__all__ = ["one_line_errors", "resolve_aliases", "suggest_flag", "unknown_flags_message"]

_HF_UNUSED = re.compile(r"not used by the HfArgumentParser: (\[.*\])", re.S)
_INVALID = re.compile(r"argument (\S+?)(?:/\S+)?: invalid .+? value: '([^']*)'")


def suggest_flag(flag: str, option_strings: Iterable[str]) -> str | None:
    """The valid flag closest to `flag` (`--r2_wieght` -> `--r2_weight`), or `None` when none is close."""
    name = flag.split("=", 1)[0]
    options = [o for o in option_strings if o.startswith("--")]
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.75)
    if not close:  # `-`/`_` spellings and case
        norm = {o.lower().replace("-", "_"): o for o in options}
        close = difflib.get_close_matches(name.lower().replace("-", "_"), list(norm), n=1, cutoff=0.75)
        close = [norm[c] for c in close]
    return close[0] if close else None


def unknown_flags_message(unknown: Iterable[str], option_strings: Iterable[str], prog: str) -> str:
    """`unrecognized argument --r2_wieght; did you mean --r2_weight? (see `hf-r2 train --help`)`."""
    options = list(option_strings)
    flags = [u for u in unknown if u.startswith("-")] or list(unknown)
    text = f"unrecognized argument{'s' if len(flags) > 1 else ''} {' '.join(flags)}"
    for flag in flags:
        close = suggest_flag(flag, options) if flag.startswith("--") else None
        if close:
            text += f"; did you mean {close}?"
            break
    return f"{text} (see `{prog} --help`)"


def _message(parser: argparse.ArgumentParser, message: str) -> str:
    options = [o for action in parser._actions for o in action.option_strings]
    if message.startswith("unrecognized arguments: "):
        return unknown_flags_message(message.split(": ", 1)[1].split(), options, parser.prog)
    found = _HF_UNUSED.search(message)
    if found:
        try:
            unknown = ast.literal_eval(found.group(1))
        except (ValueError, SyntaxError):
            unknown = found.group(1).strip("[]").split()
        return unknown_flags_message(unknown, options, parser.prog)
    invalid = _INVALID.search(message)
    if invalid:
        flag = invalid.group(1)
        action = next((a for a in parser._actions if flag in a.option_strings), None)
        expects = getattr(action, "help", None) or ""
        takes = getattr(getattr(action, "type", None), "takes", None)
        return f"{flag} got {invalid.group(2)!r}: " + (
            f"{flag} takes {takes}" if takes else f"expected a {getattr(action.type, '__name__', 'value')}"
            + (f" ({expects.rstrip('.')})" if expects else "")
        ) + "."
    return message


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser.error` raise a one-line [`UsageError`] (printed by `hf_r2.cli.main`) instead of printing the usage
    and exiting; returns `parser`."""

    def error(self: argparse.ArgumentParser, message: str):
        raise UsageError(_message(self, message), prog=self.prog)

    parser.error = types.MethodType(error, parser)  # type: ignore[method-assign]
    return parser


def resolve_aliases(parser: argparse.ArgumentParser, values: dict) -> dict:
    """`values` (a config file's mapping) with each key that is a flag's alias (`model` for `--model`, `r2-weight`
    for `--r2_weight`) renamed to the flag's field name, so a config file takes the same names as the command line.
    Keys that name no flag are left as they are (the caller reports them)."""
    names = {}
    for action in parser._actions:
        for option in action.option_strings:
            key = option.lstrip("-")
            names[key] = names[key.replace("-", "_")] = action.dest
    out = {}
    for key, value in values.items():
        dest = key if key in {a.dest for a in parser._actions} else names.get(str(key), key)
        if dest in out and dest != key:
            raise UsageError(f"the config file sets {dest!r} twice (as {key!r} and another name): keep one.")
        out[dest] = value
    return out
