"""Writes [`hf_r2.commands._low_bit_flags`], the flags of `hf-r2 ptq / qat / compress`, from the fields of their quant
configs, so that a verb's `--help` and its config cannot disagree: one flag per field, its kind from the field's type,
its default the field's, its choices the enum in `metadata["choices"]`, its help `metadata["help"]`. Run
`python -m hf_r2.commands.gen_low_bit_flags` after changing a config field (tests/commands/test_low_bit_flags.py
fails until then). The table is plain data because building the parsers must not import torch, which the configs'
modules do (`hf-r2 ptq --help` stays fast).

The fields that are no flag are [`NOT_FLAGS`], each with the reason; the flags that set no field are [`CLI_ONLY`].
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import textwrap
import types
import typing
from typing import Any

__all__ = ["CONFIGS", "NOT_FLAGS", "CLI_ONLY", "EXTRA_CHOICES", "flag_rows", "render", "main"]

#: Config -> (the verb whose flags set it, the prefix of its own flags). Block reconstruction shares the grid flags
#: (`--w-bits`, `--per-tensor`, ...) with PTQConfig, whose rows come first.
CONFIGS: dict[str, tuple[str, str]] = {
    "PTQConfig": ("ptq", ""),
    "AdaRoundConfig": ("ptq", "adaround"),
    "BlockReconstructionConfig": ("ptq", "brecq"),
    "QATConfig": ("qat", ""),
    "PalettizeConfig": ("compress", ""),
}

#: `(config, field)` -> why the field is no flag (`"*"`: every config).
NOT_FLAGS: dict[tuple[str, str], str] = {
    ("*", "version"): "the config file's format version, not a setting",
    ("PTQConfig", "adaround"): "its fields are the --adaround-* flags (AdaRoundConfig)",
    ("PTQConfig", "calibration_batches"): "the verb uses every batch --calibration-samples makes (10**6)",
    ("BlockReconstructionConfig", "calibration_batches"): "the verb uses every batch --calibration-samples makes",
    ("QATConfig", "calibration_batches"): "the config's first batches of --calibration-samples start the ranges",
}

#: Verb -> the flags that set no config field (beyond the data and fine-tune flags every verb shares), and why.
CLI_ONLY: dict[str, dict[str, str]] = {
    "ptq": {"--pre": "range reductions of the float model before the config is applied (apply_pre_steps)"},
    "qat": {},
    "compress": {"--no-bn-reestimate": "BN re-estimation after clustering is apply_low_bit_'s, not the config's"},
}

#: `(config, field)` -> (choices the verb adds to the enum's, the help that says what they do).
EXTRA_CHOICES: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("PTQConfig", "rounding"): (("brecq",), " Or brecq: block reconstruction (BlockReconstructionConfig, the "
                                "--brecq-* flags; QDrop with --drop-prob 0.5), batch norms kept as trained."),
}

# flag names that are not `<prefix>-<field>`
_FLAG_NAMES = {("BlockReconstructionConfig", "drop_prob"): "drop-prob"}
_BITS_KINDS = {"w_bits": "bits", "bits": "bits", "a_bits": "act_bits", "first_last_bits": "first_last_bits"}
_HEADER = '''"""The flags of `hf-r2 ptq / qat / compress`, one row per field of their quant configs. Generated
from the configs' `dataclasses.fields()` by `python -m hf_r2.commands.gen_low_bit_flags`: do not edit by hand."""

from __future__ import annotations

__all__ = ["VERBS", "FLAG_ROWS"]

'''


def _config_classes() -> dict[str, type]:
    from ..quant import AdaRoundConfig, BlockReconstructionConfig, PalettizeConfig, PTQConfig, QATConfig

    classes = {cls.__name__: cls for cls in (PTQConfig, AdaRoundConfig, BlockReconstructionConfig, QATConfig,
                                            PalettizeConfig)}
    return {name: classes[name] for name in CONFIGS}


def _kind(name: str, cls: type, f: dataclasses.Field) -> str:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    base = typing.get_origin(args[0]) or args[0]
    if f.name in _BITS_KINDS:
        return _BITS_KINDS[f.name]
    if base is bool:
        return "store_false" if f.default else "store_true"
    if "choices" in f.metadata:
        return "choice"
    if base is list:
        return "patterns"
    if base is int:
        return "int" if f.name == "seed" else "positive"
    if base is float:
        return "number"
    raise TypeError(f"{name}.{f.name} ({hint}) has no flag kind: give it one here, or list it in NOT_FLAGS.")


def flag_rows() -> list[tuple[Any, ...]]:
    """`(config, field, dest, flag, kind, default, choices, help)` for every field of [`CONFIGS`] but [`NOT_FLAGS`]."""
    rows, seen = [], {}
    for name, cls in _config_classes().items():
        prefix = CONFIGS[name][1]
        shared = {r[1]: r for r in rows if r[0] == "PTQConfig"} if name == "BlockReconstructionConfig" else {}
        for f in dataclasses.fields(cls):
            if (name, f.name) in NOT_FLAGS or ("*", f.name) in NOT_FLAGS:
                continue
            if f.name in shared:  # the grid flags PTQ and block reconstruction share
                ptq = shared[f.name]
                if ptq[5] != f.default:
                    raise ValueError(f"{name}.{f.name} defaults to {f.default!r}, PTQConfig's to {ptq[5]!r}: the "
                                     "shared flag needs one default.")
                rows.append((name, f.name, *ptq[2:]))
                continue
            if "help" not in f.metadata:
                raise ValueError(f"{name}.{f.name} has no metadata['help']: write it (it is the flag's help).")
            kind = _kind(name, cls, f)
            flag = f.metadata.get("flag") or _FLAG_NAMES.get((name, f.name))
            flag = flag or ("no-" if kind == "store_false" else "") + "-".join(filter(None, [prefix, f.name]))
            flag = "--" + flag.replace("_", "-")
            dest = f.name if not prefix or (name, f.name) in _FLAG_NAMES else f"{prefix}_{f.name}"
            help = f.metadata.get("flag_help", f.metadata["help"]) if kind == "store_false" else f.metadata["help"]
            choices = tuple(m.value for m in f.metadata["choices"]) if kind == "choice" else None
            extra, more = EXTRA_CHOICES.get((name, f.name), ((), ""))
            choices, help = (choices + extra, help + more) if extra else (choices, help)
            key = (CONFIGS[name][0], dest)  # one dest per verb
            if key in seen:
                raise ValueError(f"{name}.{f.name} and {seen[key]} would both set args.{dest}: rename one flag.")
            seen[key] = f"{name}.{f.name}"
            rows.append((name, f.name, dest, flag, kind, f.default, choices, help))
    return rows


def _literal(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_literal, value)) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def render() -> str:
    """The text of `hf_r2/commands/_low_bit_flags.py`."""
    verbs: dict[str, list[str]] = {}
    for name, (verb, _) in CONFIGS.items():
        verbs.setdefault(verb, []).append(name)
    out = [_HEADER, "#: The configs whose fields each verb's flags set.\nVERBS = {\n"]
    out += [f"    {_literal(verb)}: {_literal(tuple(names))},\n" for verb, names in verbs.items()]
    out.append("}\n\n#: `(config, field, dest, flag, kind, default, choices, help)`; `kind` picks the argparse type "
               "in `commands/quant.py`.\nFLAG_ROWS = (\n")
    for config, field, dest, flag, kind, default, choices, help in flag_rows():
        out.append(f"    ({', '.join(_literal(v) for v in (config, field, dest, flag, kind, default))},\n")
        out.append(f"     {_literal(choices)},\n")
        chunks = textwrap.wrap(help, 100, drop_whitespace=False, break_long_words=False, break_on_hyphens=False)
        assert "".join(chunks) == help, help
        out.append("".join(f"     {_literal(c)}\n" for c in chunks[:-1]) + f"     {_literal(chunks[-1])}),\n")
    out.append(")\n")
    text = "".join(out)
    too_long = [line for line in text.splitlines() if len(line) > 119]
    assert not too_long, too_long
    return text


def main(argv: list[str] | None = None) -> int:
    """Write the table (`--check`: only say whether it is up to date, status 1 if not)."""
    argv = sys.argv[1:] if argv is None else argv
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_low_bit_flags.py")
    text = render()
    current = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            current = file.read()
    if "--check" in argv:
        print("up to date" if current == text else f"{path} is stale: run python -m hf_r2.commands.gen_low_bit_flags")
        return 0 if current == text else 1
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
