"""The one way in: strict YAML (safe, no duplicate keys, YAML 1.2 numbers), `key.path=value` overrides
parsed as YAML scalars, and validation that raises ConfigError with one readable line per problem."""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gradexp.config.schema import SHOWN_CHARS, Config, ConfigError, shorten


class Loader(yaml.SafeLoader):
    """The safe loader, stricter in two ways that make a typo run a different experiment silently:
    a key repeated in one mapping is refused (else the last one wins), and YAML 1.1's base-60 numbers
    are text (`depth: 1:20` would be 80)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {shorten(key)} (first on line {seen[key]})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the constructor itself refuses it
                continue
        return super().construct_mapping(node, deep)


# YAML 1.1's int and float patterns without their base-60 forms (1:20, 1:20.5)
_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
# and YAML 1.2's exponent forms (1e-3, 1E5: text in YAML 1.1, so a quoted-looking string to pydantic)
_FLOAT = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
Loader.yaml_implicit_resolvers = {
    first: [(tag, {"tag:yaml.org,2002:int": _INT, "tag:yaml.org,2002:float": _FLOAT}.get(tag, rx))
            for tag, rx in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


MAX_DEPTH = 32  # a config is 2 levels deep, a sweep file 4; Python's stack ends near 1000 (RecursionError)
# values a YAML text may expand to, its aliases followed: a config has ~100, a large sweep file a few
# thousand; nine nested aliases of ten ("billion laughs", 1 KB) expand to 1e9 and hang whatever walks
# them (point names, to_yaml, plan.json), though the loader itself shares the aliased objects
MAX_NODES = 100_000


def expanded_size(root: yaml.Node) -> int:
    """How many nodes `root` stands for with every alias expanded (a node reached twice counts twice),
    counted once per node (memoised, without recursion); a node that contains itself is infinite."""
    size: dict[int, float] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        kids = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        if done:
            open_.discard(id(node))
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            continue
        if id(node) in open_:  # reached again before it was counted: it contains itself
            return math.inf
        open_.add(id(node))
        stack.append((node, True))
        stack += [(k, False) for k in kids if id(k) not in size]
    return size[id(root)]


def yaml_load(text: str) -> Any:
    """YAML text through `Loader`; nesting deeper than MAX_DEPTH, or expanding (its aliases followed)
    to more than MAX_NODES values, is a YAMLError like any other."""
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None and expanded_size(node) > MAX_NODES:
            raise yaml.YAMLError(f"expands to more than {MAX_NODES:,} values once its aliases (*name) are followed")
        value = loader.construct_document(node) if node is not None else None
    except RecursionError:
        value = None
    else:
        loader.dispose()
        stack, deepest = [(value, 1)], {}  # deepest: id -> depth seen (aliases share a node)
        while stack:  # without recursion: what is checked here could be too deep for the stack
            node, depth = stack.pop()
            if not isinstance(node, (dict, list)) or deepest.get(id(node), 0) >= depth:
                continue
            if depth > MAX_DEPTH:
                break
            deepest[id(node)] = depth
            stack += [(v, depth + 1) for v in (node.values() if isinstance(node, dict) else node)]
        else:
            return value
    raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep")


def yaml_scalar(text: str) -> Any:
    """A command-line value parsed as a YAML scalar: 5 -> int, true -> bool, relu -> str; '' and what
    YAML cannot read stay the text."""
    try:
        return yaml_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def set_key(raw: dict, key: str, value: Any) -> None:
    """Set a dotted `key` ('model.depth') in a nested dict, making (or replacing) sections on the way."""
    node = raw
    *path, leaf = key.split(".")
    for part in path:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'model': {'depth': 20}} and {'model.depth': 20} both -> {'model.depth': 20}."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _fields_at(path: tuple[str, ...]) -> list[str] | None:
    """Known keys at a dotted path of the schema, or None when the path is no section."""
    model: type[BaseModel] = Config
    for key in path:
        field = model.model_fields.get(key)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return list(model.model_fields)


def _cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """Text cut to `limit` characters with '...' (a key as typed, not quoted)."""
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return text if len(text) <= limit else text[:limit - 3] + "..."


def unknown_key(path: tuple[str, ...]) -> str:
    known = _fields_at(path[:-1]) or []
    where = ".".join(_cut(p) for p in path)
    hint = difflib.get_close_matches(path[-1], known, n=1) if len(path[-1]) <= 100 else []
    msg = f"{where}: unknown key"
    if hint:
        msg += f" (did you mean '{'.'.join(path[:-1] + (hint[0],))}'?)"
    return msg + f"; known keys here: {', '.join(known)}"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`key.path=value` items -> {'key.path': value} in order (values parsed as YAML scalars; a repeated
    key: the last wins). Raises ConfigError naming every malformed item."""
    parsed, problems = {}, []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{_cut(item)}': expected key.path=value, e.g. model.depth=10")
            continue
        key, value = item.split("=", 1)
        if not all(key.strip().split(".")):
            problems.append(f"override '{_cut(item)}': empty key")
            continue
        parsed[key.strip()] = yaml_scalar(value)
    if problems:
        raise ConfigError(problems)
    return parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each `key.path=value` in a nested dict (value parsed as a YAML scalar)."""
    for key, value in parse_overrides(overrides).items():
        set_key(raw, key, value)
    return raw


def _describe(err: dict) -> str:
    path = tuple(shorten(p, 40) if not isinstance(p, str) else _cut(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return unknown_key(path)
    where = ".".join(path)
    if not where:  # a check across sections: its message names the keys
        return err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("."):  # a section's own check naming one of its keys: '.depth: ...'
        return f"{where}{msg}"
    if isinstance(got, (dict, list)):
        return f"{where}: {msg}"
    return f"{where}: {msg} (got {shorten(got)})"


def validate(raw: Any) -> Config:
    """Validate a nested dict as a Config, raising ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping of keys to values, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([_describe(err) for err in e.errors()]) from None


def read_yaml(path: str | Path) -> Any:
    """Read a UTF-8 YAML file with the safe `Loader`; syntax errors (and duplicate keys) become
    ConfigError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: config files must be UTF-8; byte {e.start} is not (0x{e.object[e.start]:02x}; "
                          "a UTF-16 or Latin-1 file? save it as UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror})") from None
    try:
        return yaml_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or str(e)
        kind = "YAML syntax error" if mark else "YAML refused"  # too deep or too large, not malformed
        raise ConfigError(f"{kind} in {where}: {problem}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The one way in: YAML file (or defaults) + overrides -> validated Config."""
    raw = read_yaml(path) if path is not None else {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return validate(apply_overrides(raw, list(overrides)))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def flat(cfg: Config) -> dict[str, Any]:
    """The config as {'model.depth': 20, ...} (for HParams and sweep tables)."""
    return flatten(cfg.model_dump())
