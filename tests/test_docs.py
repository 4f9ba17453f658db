"""The README's tables say what the code defines: every statistic of the registry has its row; the
table of config keys is the one the schema makes."""

from __future__ import annotations

import re

from conftest import ROOT
from gradexp.config import key_docs, keys_markdown
from gradexp.sinks.tensorboard import CHART_ORDER, probe_section
from gradexp.probes.stats import STATS


def test_the_statistics_table_lists_every_statistic_and_nothing_else():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- stats-table:start -->")[1].split("<!-- stats-table:end -->")[0]
    rows = {m.group(1): line for line in table.splitlines() if (m := re.match(r"\| `(\w+)` \|", line))}
    assert list(rows) == list(CHART_ORDER) and set(rows) == set(STATS)  # in the order TensorBoard shows them
    for name, stat in STATS.items():  # each row names its chart and says when it is measured, by its group
        assert f"| `{probe_section(name)}` |" in rows[name], rows[name]
        assert ("weight_every" in rows[name]) == (stat.group == "weight"), rows[name]


def test_the_config_keys_table_is_the_schemas():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- keys-table:start -->\n")[1].split("<!-- keys-table:end -->")[0]
    assert table == keys_markdown(key_docs()), \
        "README.md's table of config keys is out of date: put `gradexp keys --markdown` between its markers"
