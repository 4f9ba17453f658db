"""The README's tables say what the code defines: every statistic of the registry has its row; the
table of config keys is the one the schema makes."""

from __future__ import annotations

import re

from conftest import ROOT
from gradexp.config import key_docs, keys_markdown
from gradexp.stats import STATS


def test_the_statistics_table_lists_every_statistic_and_nothing_else():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- stats-table:start -->")[1].split("<!-- stats-table:end -->")[0]
    listed = set(re.findall(r"`(\w+)/<layer>`", table))
    assert listed == set(STATS)
    for name, stat in STATS.items():  # each row says when it is measured, by its group
        row = next(line for line in table.splitlines() if f"`{name}/<layer>`" in line)
        assert ("weight_every" in row) == (stat.group == "weight"), row


def test_the_config_keys_table_is_the_schemas():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- keys-table:start -->\n")[1].split("<!-- keys-table:end -->")[0]
    assert table == keys_markdown(key_docs()), \
        "README.md's table of config keys is out of date: put `gradexp keys --markdown` between its markers"
