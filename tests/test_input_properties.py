"""Property-based tests of everything that reads user input (hypothesis): whatever the config file,
the `key=value` overrides or the sweep file hold, the result is a valid config or a ConfigError,
never another exception; through the CLI, exit code 0 or 2, never a traceback. Bounded budgets
(a few seconds in all), no deadline (the first example pays pydantic's and torch's imports)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradexp.config import Config, ConfigError, flat, load_config, parse_overrides
from gradexp.sweep.plan import check, load_plan

BUDGET = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = sorted(flat(Config()))  # every dotted key: most generated keys are real ones
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 3), st.floats(), st.floats(-1e3, 1e3),
    st.text(max_size=12), st.sampled_from(["relu", "sigmoid", "auto", "cpu", "1:20", "1e308", "0x10", "\n", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
key_parts = st.one_of(st.sampled_from(SECTIONS + [k.split(".")[-1] for k in KEYS]), st.text(max_size=8))
dotted = st.one_of(st.sampled_from(KEYS), st.lists(key_parts, min_size=1, max_size=3).map(".".join))


@st.composite
def configs(draw) -> dict:
    """A config as nested dicts: real sections and keys with arbitrary values, and unknown keys."""
    raw: dict = {}
    for key in draw(st.lists(dotted, max_size=6)):
        node, *path = raw, *key.split(".")
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else node
        node[path[-1]] = draw(values)
    return raw


def refused_or_valid(load) -> None:
    try:
        load()
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


FOLDER = tempfile.TemporaryDirectory(prefix="gradexp-properties-")  # one file, rewritten for each example


def in_file(text: str | bytes) -> Path:
    path = Path(FOLDER.name) / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@BUDGET
@given(configs())
def test_config_files_load_or_are_refused(raw):
    path = in_file(yaml.safe_dump(raw))
    refused_or_valid(lambda: load_config(path))


@BUDGET
@given(st.one_of(st.text(max_size=80), st.binary(max_size=80),
                 st.lists(st.sampled_from(["a:", " b: 1", "- x", "[", "{", "&a", "*a", "<<: *a", "!!str", "?",
                                           "depth: 1:20", "model:", "  depth: 3", "  depth: 4", "\t", "é"]),
                          max_size=8).map("\n".join)))
def test_any_text_as_a_config_file_loads_or_is_refused(text):
    path = in_file(text)
    refused_or_valid(lambda: load_config(path))


@BUDGET
@given(st.lists(st.one_of(st.tuples(dotted, st.text(max_size=12)).map("=".join), st.text(max_size=16)), max_size=5))
def test_overrides_parse_and_apply_or_are_refused(items):
    refused_or_valid(lambda: parse_overrides(items))
    refused_or_valid(lambda: load_config(None, items))


sweep_files = st.fixed_dictionaries({}, optional={
    "name": scalars, "base": st.one_of(configs(), scalars), "seeds": st.one_of(values, st.lists(st.integers(), max_size=3)),
    "grid": st.one_of(st.dictionaries(dotted, st.lists(scalars, min_size=1, max_size=3), max_size=2), values),
    "runs": st.one_of(st.dictionaries(st.text(max_size=6), st.dictionaries(dotted, scalars, max_size=2), max_size=2),
                      values),
    "bogus": scalars,
})


@BUDGET
@given(sweep_files)
def test_sweep_files_expand_and_check_or_are_refused(raw):
    path = in_file(yaml.safe_dump(raw))
    refused_or_valid(lambda: check(load_plan(path)))


@settings(max_examples=15, deadline=None)
@given(st.one_of(configs(), sweep_files))
def test_cli_validate_gives_0_or_2_never_a_traceback(raw):
    from typer.testing import CliRunner

    from gradexp.cli import app

    result = CliRunner().invoke(app, ["validate", str(in_file(yaml.safe_dump(raw)))])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
