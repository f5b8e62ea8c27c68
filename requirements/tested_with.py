"""The README's "Tested with" line, generated from requirements/constraints.txt (the versions `make` installs and CI
tests), so that the two cannot disagree (tests/test_packaging.py checks it).

    python requirements/tested_with.py            # print the line
    python requirements/tested_with.py --write    # and put it into README.md, in place of the old paragraph
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
README = ROOT / "README.md"
#: The pins the line names, in its order (the rest of the file's pins are named as "requirements/constraints.txt").
SHOWN = ("torch", "torchvision", "timm", "transformers", "accelerate", "huggingface_hub", "datasets", "onnxruntime",
         "coremltools")
PREFIX = "Tested with "


def pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """`{name: version}` of every `name==version` line (names lower case, `-` and `.` as `_`)."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if match:
            found[re.sub(r"[-.]", "_", match.group(1).lower())] = match.group(2)
    return found


def python_version(path: Path = CONSTRAINTS) -> str:
    match = re.search(r"^# python (\S+):", path.read_text(encoding="utf-8"), flags=re.M)
    if not match:
        raise SystemExit(f"{path}: no '# python X.Y:' line")
    return match.group(1)


def tested_with(path: Path = CONSTRAINTS) -> str:
    """The README's line: Python and the pins in [`SHOWN`], then where the rest is."""
    versions = pins(path)
    missing = [name for name in SHOWN if name not in versions]
    if missing:
        raise SystemExit(f"{path}: no pin for {missing}")
    named = [f"Python {python_version(path)}", *(f"{name} {versions[name]}" for name in SHOWN)]
    return (f"{PREFIX}{', '.join(named[:-1])} and {named[-1]}, the versions `make` installs and CI tests, pinned with "
            "the rest in `requirements/constraints.txt`.")


def paragraph(path: Path = CONSTRAINTS) -> str:
    """[`tested_with`] as the README holds it: a paragraph of its own, wrapped at 119 characters."""
    return textwrap.fill(tested_with(path), 119, break_on_hyphens=False, break_long_words=False)


def readme_paragraph(text: str) -> str | None:
    """The README's current paragraph starting with [`PREFIX`] (up to the next blank line), or `None`."""
    found = [p for p in re.split(r"\n\s*\n", text) if p.startswith(PREFIX)]
    return found[0] if len(found) == 1 else None


def main(argv: list[str]) -> int:
    new = paragraph()
    print(new)
    if "--write" in argv:
        text = README.read_text(encoding="utf-8")
        old = readme_paragraph(text)
        if old is None:
            print(f"README.md: no single paragraph starting with {PREFIX!r} to replace", file=sys.stderr)
            return 1
        README.write_text(text.replace(old, new), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
