"""The experiment config: one typed schema, defaults in code, YAML over them, overrides over that.

Every user-facing key lives here. `load_config` is the one way in: it reads a YAML file safely,
applies `key.path=value` overrides (values parsed as YAML scalars), validates the result and raises
`ConfigError` with one readable line per problem (key path, bad value, what is allowed).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ACTIVATION_NAMES = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "selu", "softsign", "identity")
NORM_NAMES = ("none", "batchnorm", "layernorm")
INIT_NAMES = (
    "default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "normal",
)
DATASET_NAMES = ("digits", "gaussian", "spirals", "mnist", "fashion_mnist", "cifar10")
TORCHVISION_DATASETS = ("mnist", "fashion_mnist", "cifar10")
OPTIMIZER_NAMES = ("sgd", "momentum", "adam", "adamw")


class ConfigError(Exception):
    """Bad user input: each entry of `problems` is one line naming the key, the value and what is allowed."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class _Section(BaseModel):
    # allow_inf_nan=False: optim.lr=.inf is a typo, not an experiment
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, data: Any) -> Any:
        # pydantic's lax mode reads true as 1: model.depth=true must be refused, not run at depth 1
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and field.annotation in (int, float, int | None):
                    raise ValueError(f".{key}: expected a number (got {str(value).lower()})")
        return data


class DataConfig(_Section):
    name: Literal[DATASET_NAMES] = "digits"  # type: ignore[valid-type]
    batch_size: int = Field(128, ge=1)
    n_train: int | None = Field(None, ge=1, description="training examples (None: the dataset's own split)")
    n_eval: int | None = Field(None, ge=1, description="held-out examples (None: the dataset's own split)")
    dim: int = Field(64, ge=1, description="gaussian: input size")
    classes: int = Field(10, ge=2, description="gaussian, spirals: number of classes")
    labels: Literal["teacher", "random"] = "teacher"
    noise: float = Field(0.2, ge=0, description="spirals: std of the added noise")
    root: str = Field("data", description="torchvision datasets: folder holding the files")
    download: bool = False


_TARGET = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
BUILT_IN_KEYS = ("depth", "width", "activation", "norm", "residual", "init", "init_gain", "bias_init")


class ModelConfig(_Section):
    kind: Literal["mlp", "cnn", "custom"] = "mlp"
    depth: int = Field(20, ge=1, le=1000, description="hidden layers (mlp) or conv blocks (cnn)")
    width: int = Field(64, ge=1, description="units (mlp) or channels (cnn)")
    activation: Literal[ACTIVATION_NAMES] = "sigmoid"  # type: ignore[valid-type]
    norm: Literal[NORM_NAMES] = "none"  # type: ignore[valid-type]
    residual: bool = False
    init: Literal[INIT_NAMES] = "default"  # type: ignore[valid-type]
    init_gain: float = Field(1.0, gt=0)
    bias_init: Literal["default", "zero"] = "default"
    target: str | None = Field(None, description="custom: 'package.module:factory', called as "
                                                 "factory(in_shape, classes, **kwargs); this runs that code")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="custom: keyword arguments of the factory")

    @model_validator(mode="after")
    def _custom_needs_a_target(self) -> "ModelConfig":
        if self.kind == "custom":
            if self.target is None:
                raise ValueError(".target: model.kind=custom needs model.target='package.module:factory'")
            if not _TARGET.match(self.target):
                raise ValueError(f".target: expected 'package.module:factory' (got {self.target!r})")
            unused = [k for k in BUILT_IN_KEYS if k in self.model_fields_set]
            if unused:
                raise ValueError(f".{unused[0]}: not used by model.kind=custom (its factory builds the whole "
                                 f"model); leave out {', '.join('model.' + k for k in unused)}")
        elif self.target is not None or self.kwargs:
            raise ValueError(f".target: model.target and model.kwargs are for model.kind=custom (got {self.kind})")
        return self


class OptimConfig(_Section):
    name: Literal[OPTIMIZER_NAMES] = "sgd"  # type: ignore[valid-type]
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="used by `momentum` only")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (decoupled for adamw)")
    l1: float = Field(0.0, ge=0, description="L1 penalty on the weights, added to the loss")


class ClipConfig(_Section):
    mode: Literal["none", "norm", "value"] = "none"
    max: float = Field(1.0, gt=0)


class TrainConfig(_Section):
    steps: int = Field(300, ge=1, description="optimizer steps")
    eval_every: int = Field(100, ge=0)
    log_every: int = Field(10, ge=0, description="gradient and activation probes every N steps; 0 turns them off")
    weight_every: int = Field(100, ge=0, description="weight probes (weight_norm, update_ratio, dist_from_init) every "
                                                     "N steps: they copy the weights, the costliest probes; 0: off")
    hist_every: int = Field(100, ge=0, description="histograms every N steps; 0 turns them off")
    flush_denormal: bool = Field(True, description="CPU: flush float32 denormals to 0 (they are many times slower)")
    threads: Literal["auto"] | int | None = Field(
        "auto", description="CPU threads torch uses for this run; auto: 1 for small steps or on a busy machine, "
                            "else the process's own less the cores others keep busy; None: as the process has it")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        if v is None or v == "auto" or (type(v) is int and v >= 1):
            return v
        raise ValueError("expected auto, null or a number of threads >= 1")


class PretrainConfig(_Section):
    """Greedy layer-wise pre-training (Bengio et al. 2007): each hidden layer an autoencoder."""
    enabled: bool = False
    method: Literal["autoencoder", "denoising"] = "autoencoder"
    noise: float = Field(0.3, ge=0, lt=1, description="denoising: fraction of input entries set to 0")
    steps: int = Field(300, ge=1, description="optimizer steps per hidden layer")
    optim: Literal[OPTIMIZER_NAMES] = "adam"  # type: ignore[valid-type]
    lr: float = Field(1e-3, gt=0)
    batch_size: int | None = Field(None, ge=1, description="None: data.batch_size")


class DiagnosisConfig(_Section):
    vanishing_below: float = Field(1e-2, gt=0, lt=1, description="first/last gradient ratio under this: vanishing")
    exploding_above: float = Field(1e2, gt=1, description="first/last gradient ratio over this: exploding")


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Config(_Section):
    name: str = "experiment"
    seed: int = 0
    device: str = "auto"
    precision: Literal["float32", "float64"] = "float32"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    clip: ClipConfig = ClipConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    diagnosis: DiagnosisConfig = DiagnosisConfig()

    @model_validator(mode="after")
    def _pretrain_needs_mlp(self) -> "Config":
        if self.pretrain.enabled and self.model.kind != "mlp":
            raise ValueError("pretrain.enabled: greedy layer-wise pre-training is for model.kind=mlp; "
                             f"got model.kind={self.model.kind}")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes a folder under --out: it must not be able to escape it.
        if not _NAME.match(v) or len(v) > 100:
            raise ValueError("must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, v: str) -> str:
        if not re.match(r"^(auto|cpu|cuda|cuda:\d+)$", v):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v


# ---------------------------------------------------------------------------------------------- loading

def yaml_scalar(text: str) -> Any:
    """A command-line value parsed as a YAML scalar: 5 -> int, true -> bool, relu -> str; '' and what
    YAML cannot read stay the text."""
    try:
        return yaml.safe_load(text) if text != "" else ""
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


def _unknown_key(path: tuple[str, ...]) -> str:
    known = _fields_at(path[:-1]) or []
    where = ".".join(path)
    hint = difflib.get_close_matches(path[-1], known, n=1)
    msg = f"{where}: unknown key"
    if hint:
        msg += f" (did you mean '{'.'.join(path[:-1] + (hint[0],))}'?)"
    return msg + f"; known keys here: {', '.join(known)}"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each `key.path=value` in a nested dict (value parsed as a YAML scalar)."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override '{item}': expected key.path=value, e.g. model.depth=10")
            continue
        key, value = item.split("=", 1)
        if not all(key.strip().split(".")):
            problems.append(f"override '{item}': empty key")
            continue
        set_key(raw, key.strip(), yaml_scalar(value))
    if problems:
        raise ConfigError(problems)
    return raw


def _describe(err: dict) -> str:
    path = tuple(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return _unknown_key(path)
    where = ".".join(path)
    if not where:  # a check across sections: its message names the keys
        return err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith("."):  # a section's own check naming one of its keys: '.depth: ...'
        return f"{where}{msg}"
    if isinstance(got, (dict, list)):
        return f"{where}: {msg}"
    return f"{where}: {msg} (got {got!r})"


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
    """Read a YAML file with the safe loader; syntax errors become ConfigError naming the line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"YAML syntax error in {where}: {problem}") from None


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
