"""The README's Python blocks run as written (as transformers checks its docs): each ```python block of README.md
and docs/*.md runs in a fresh interpreter, the blocks of one page in order and in one temporary folder, so that a
later block may load a folder an earlier one saved (as a reader following the page would) but no Python name carries
over. Tiny models and the local CIFAR-10 copy keep them fast; nothing is downloaded.

A block that cannot run here (it needs a GPU, the Hub, the user's own repository) is marked by an HTML comment right
before it, saying why: `<!-- no-test: pushes to the Hub -->`. Use it only where running is impossible."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", flags=re.S | re.M)
NO_TEST = re.compile(r"<!--\s*no-test:((?:(?!-->).)*)-->\s*\Z", flags=re.S)  # the comment right before a block


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """`(line, code, reason)` of each ```python block: its first line's number, its code, and the reason of the
    `<!-- no-test: reason -->` comment right before it (`None` when it is to run)."""
    blocks = []
    for match in BLOCK.finditer(text):
        marker = NO_TEST.search(text[: match.start()])
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1),
                       marker.group(1).strip() if marker else None))
    return blocks


def test_python_blocks_and_markers_are_found():
    text = "a\n```python\nx = 1\n```\n\n<!-- no-test: needs a GPU -->\n```python\ny = 2\n```\n```bash\nz\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n", None), (7, "y = 2\n", "needs a GPU")]
    assert python_blocks("<!-- no-test: -->\nnot a block\n```python\nx\n```\n") == [(3, "x\n", None)]
    assert python_blocks("<!-- no-test: a -->\n```python\nx\n```\n<!-- other -->\n```python\ny\n```\n")[1][2] is None


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text(encoding="utf-8")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run_as_written(page, data_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_R2_DATA_DIR": str(data_dir), "MPLBACKEND": "Agg"}
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    for line, code, reason in blocks:
        if reason is not None:
            assert reason, f"{page.name}:{line}: a no-test marker says why"
            continue
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{page.name}, the block at line {line}:\n{code}\n{done.stderr[-3000:]}"
