"""The README and docs/ as a reader meets them: every relative link resolves (file and heading), no internal issue
number appears where a user reads, the README keeps its two commands and stays a product page, and its headline
table's figures are those of the committed results under docs/results/ (retention computed from them)."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from hf_r2.reproduce.summary import claim_of, verdict

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (but `-`), spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for url in re.findall(r"\]\(([^)\s]+)\)", text):
        if url.startswith(("http://", "https://")):
            continue
        path, _, anchor = url.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {url} does not exist"
        if anchor:
            assert anchor in _anchors(target), f"{page.name}: no heading #{anchor} in {target.name}"


def test_no_internal_issue_numbers():
    for path in [*PAGES, *sorted((ROOT / "hf_r2" / "reproduce" / "configs").glob("*.yaml"))]:
        hits = re.findall(r"\bissues? \d+", path.read_text(encoding="utf-8"), flags=re.I)
        assert not hits, f"{path.relative_to(ROOT)} cites {hits}: name the section or config instead"


def test_readme_is_a_product_page_with_its_two_commands():
    text = README.read_text(encoding="utf-8")
    assert re.search(r"^make demo\b", text, flags=re.M) and re.search(r"^make test\b", text, flags=re.M)
    assert len(text.splitlines()) <= 350, "the README is the first screen: details go to docs/"
    for page in ("docs/cli.md", "docs/results.md", "docs/decisions.md", "docs/development.md"):
        assert f"]({page})" in text


def _runs(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["runs"]


def test_headline_table_matches_the_committed_results():
    evidence = _runs(ROOT / "docs/results/evidence/results.json")
    scratch = _runs(ROOT / "docs/results/evidence-scratch/results.json")

    def pick(runs, model, variant, seed=None):
        found = [r for r in runs if r["model"] == model and r["variant"]["name"] == variant
                 and (seed is None or r["seed"] == seed)]
        assert found, (model, variant, seed)
        return found

    def cells(reference, r2, row):
        """The README's cells for one headline row: top-1, gain, retention and FP, reference -> R2."""
        def mean(runs, f):
            return statistics.mean(f(r) for r in runs)

        acc = lambda r, k: 100 * r["rows"][k]["accuracy"]  # noqa: E731
        low = [mean(runs, lambda r: acc(r, row)) for runs in (reference, r2)]
        ret = [mean(runs, lambda r: acc(r, row) / acc(r, "FP")) for runs in (reference, r2)]
        fp = [mean(runs, lambda r: acc(r, "FP")) for runs in (reference, r2)]
        return [f"{low[0]:.2f} -> {low[1]:.2f} (", f"{low[1] - low[0]:+.2f}",
                f"{100 * ret[0]:.1f} % -> {100 * ret[1]:.1f} %", f"{fp[0]:.2f} -> {fp[1]:.2f}"]

    mnv2, r18 = "mobilenetv2_100", "resnet18"
    expected = [
        (pick(evidence, mnv2, "baseline"), pick(scratch, mnv2, "linf_scratch_1"), "W2A8 per-tensor maxabs"),
        (pick(evidence, mnv2, "baseline"), pick(scratch, mnv2, "linf_scratch_1"), "W2A8 per-channel mse"),
        (pick(evidence, mnv2, "control"), pick(evidence, mnv2, "linf"), "W2A8 per-tensor maxabs"),
        (pick(evidence, mnv2, "baseline"), pick(scratch, mnv2, "linf_scratch_1"), "W2A2 QAT"),
        (pick(evidence, mnv2, "control", 0), pick(evidence, mnv2, "linf", 0), "W2A2 QAT"),
        (pick(evidence, r18, "baseline"), pick(scratch, r18, "linf_scratch_03_r18"), "W1 k-means"),
        (pick(evidence, r18, "control"), pick(evidence, r18, "soft_min_max"), "W1 k-means"),
    ]
    table = [line for line in README.read_text(encoding="utf-8").splitlines()
             if line.startswith("|") and " -> " in line and "%" in line]
    assert len(table) == len(expected), "one README line per headline row"
    for line, (reference, r2, row) in zip(table, expected):
        for cell in cells(reference, r2, row):
            assert cell in line, f"{row}: {cell!r} not in {line!r}"
        assert line.rstrip(" |").endswith(f"| {min(len(reference), len(r2))}"), f"seeds column: {line!r}"
        # the verdict is the library's (one function for results.md and the README), and bold marks exactly "met"
        low = [statistics.mean(100 * r["rows"][row]["accuracy"] for r in runs) for runs in (reference, r2)]
        fp = [statistics.mean(100 * r["rows"]["FP"]["accuracy"] for r in runs) for runs in (reference, r2)]
        claim = claim_of({"method": "qat" if "QAT" in row else "kmeans" if "k-means" in row else "ptq",
                          "w_bits": 1 if row.startswith("W1") else 2, "a_bits": None if row.startswith("W1") else
                          int(row[3])})
        decided = verdict(low[1] - low[0], claim["target"], fp[1] - fp[0])
        assert f"| {decided} |" in line, f"{row}: verdict {decided!r} not in {line!r}"
        assert ("(**+" in line) == (decided == "met"), f"bold iff met: {line!r}"


def test_demo_table_is_what_the_demo_prints():
    """The README's Quick-start table is, line for line, the table `make demo` printed (committed under
    docs/results/demo/, rendered again here from its results.json by the same report code), so it cannot drift."""
    from hf_r2.reproduce.report import format_report

    committed = ROOT / "docs/results/demo"
    results = json.loads((committed / "results.json").read_text(encoding="utf-8"))
    printed = format_report(results)
    assert printed == (committed / "results.md").read_text(encoding="utf-8"), "results.md: the report of results.json"
    section = printed.split("## resnet10t", 1)[1]
    table = [line for line in section.splitlines() if line.startswith("|")]
    table = table[: next(i for i, line in enumerate(table) if "kurtosis" in line) + 1]
    readme = README.read_text(encoding="utf-8")
    assert "\n".join(table) in readme, "the README's demo table is not the committed demo run's: copy it again"
    # the demo's numbers hold for its default thread count (other counts sum in another order)
    from hf_r2.commands.reproduce import DEMO_THREADS

    assert f"with {DEMO_THREADS} threads" in results["timing"]["machine"]
