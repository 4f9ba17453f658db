"""The command line's own options: `--version`, and `gradexp keys`, every config key read from the schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from typing import Literal, get_args, get_origin

from pydantic import BaseModel

from conftest import ROOT
from gradexp.config import Config


def leaves(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Every leaf key of a schema with its default, found by walking the pydantic models."""
    out = {}
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(leaves(field.annotation, f"{prefix}{name}."))
        else:
            out[prefix + name] = field.get_default(call_default_factory=True)
    return out


def test_version_is_the_installed_one_and_imports_no_torch():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for flag in ("--version", "-V"):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "gradexp", flag], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"gradexp {version('gradexp')}\n"
        imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        assert not {m for m in imported if m == "torch" or m.startswith("torch.")}


def test_keys_lists_every_key_of_the_schema_with_its_default_and_meaning(cli):
    result = cli("keys")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    expected = leaves(Config)
    assert len(expected) > 40
    for key, default in expected.items():
        shown = default if isinstance(default, str) else json.dumps(default)
        assert key in rows and f" {shown} " in rows[key], (key, shown, rows.get(key))
    # the markdown table: a row per key, each with a meaning, Literal choices and numeric bounds spelt out
    table = cli("keys", "--markdown").output
    for key in expected:
        row = next(line for line in table.splitlines() if line.startswith(f"| `{key}` |"))
        allowed, meaning = row.split(" | ")[1], row.split(" | ")[3]
        assert meaning.strip(" |"), f"{key} has no description in the schema"
        section, _, leaf = key.rpartition(".")
        model = type(getattr(Config(), section)) if section else Config
        annotation = model.model_fields[leaf].annotation
        if get_origin(annotation) is Literal:
            assert allowed == ", ".join(get_args(annotation)), (key, allowed)
    assert "| `model.depth` | integer in [1, 1000] | `20` |" in table
    assert "| `optim.momentum` | number in [0, 1) | `0.9` |" in table
    assert "| `data.n_train` | integer >= 2 or null | `null` |" in table


def test_keys_of_a_section_and_an_unknown_one(cli):
    result = cli("keys", "train")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.splitlines() if line.strip().startswith("train.")]
    assert listed == [k for k in leaves(Config) if k.startswith("train.")]
    assert "model.depth" not in result.output
    result = cli("keys", "model.dept")
    assert result.exit_code == 2 and "did you mean 'model.depth'?" in result.output
