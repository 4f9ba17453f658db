"""The docs say what the code defines, and nothing in them points nowhere: every statistic of the
registry has its row; the table of config keys is the one the schema makes; the README stays a
short page; every relative link of the README and the docs pages names a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT
from gradexp.config import key_docs, keys_markdown
from gradexp.sinks.tensorboard import CHART_ORDER, probe_section
from gradexp.probes.stats import STATS

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
# [text](target) and ![alt](target), the target up to whitespace or ')'; code spans and fenced
# blocks are taken out first, where a bracket is text, not a link
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")


def between(text: str, marker: str) -> str:
    start, end = f"<!-- {marker}:start -->\n", f"<!-- {marker}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"one {start!r} and one {end!r} expected"
    return text.split(start)[1].split(end)[0]


def relative_links(text: str) -> list[str]:
    """The link targets of a Markdown text that are paths (no scheme, no pure #anchor), without their
    #anchor."""
    text = CODE.sub("", FENCE.sub("", text))
    targets = [m.group(1) for m in LINK.finditer(text)]
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_the_statistics_table_lists_every_statistic_and_nothing_else():
    table = between((DOCS / "probes-and-tensorboard.md").read_text(), "stats-table")
    rows = {m.group(1): line for line in table.splitlines() if (m := re.match(r"\| `(\w+)` \|", line))}
    assert list(rows) == list(CHART_ORDER) and set(rows) == set(STATS)  # in the order TensorBoard shows them
    for name, stat in STATS.items():  # each row names its chart and says when it is measured, by its group
        assert f"| `{probe_section(name)}` |" in rows[name], rows[name]
        assert ("weight_every" in rows[name]) == (stat.group == "weight"), rows[name]


def test_the_config_keys_table_is_the_schemas():
    table = between((DOCS / "configuration.md").read_text(), "keys-table")
    assert table == keys_markdown(key_docs()), \
        "docs/configuration.md's table of config keys is out of date: put `gradexp keys --markdown` between its markers"


def test_the_readme_is_a_short_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to a page under docs/"


def test_the_link_finder_finds_what_a_renderer_would_and_only_that():
    text = ("[a](docs/x.md#part) ![b](y.png) [c](https://e.org/z) [d](#here) `[e](no.md)`\n"
            "```\n[f](nor.md)\n```\n")
    assert relative_links(text) == ["docs/x.md", "y.png"]


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "CHANGELOG.md", *PAGES], ids=lambda p: p.name)
def test_every_relative_link_names_a_file_that_exists(page: Path):
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"


def test_every_page_is_in_the_sites_nav():
    # mkdocs --strict warns of a page left out of nav; this says which, without building the site
    nav = (ROOT / "mkdocs.yml").read_text()
    assert PAGES and [p.name for p in PAGES if f": {p.name}\n" not in nav] == []
