"""The experiment config: one typed schema, defaults in code, YAML over them, overrides over that.

Every user-facing key lives here. `load_config` is the one way in: it reads a YAML file safely,
applies `key.path=value` overrides (values parsed as YAML scalars), validates the result and raises
`ConfigError` with one readable line per problem (key path, bad value, what is allowed).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ACTIVATION_NAMES = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "selu", "softsign", "identity")
NORM_NAMES = ("none", "batchnorm", "layernorm")
INIT_NAMES = (
    "default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal", "normal",
)
DATASET_NAMES = ("digits", "gaussian", "spirals", "mnist", "fashion_mnist", "cifar10", "adding", "copy", "reverse", "sort")
FILE_DATASETS = ("mnist", "fashion_mnist", "cifar10")  # read from files under data.root
SEQUENCE_TASKS = ("adding", "copy", "reverse", "sort")  # gradexp/sequences.py
OPTIMIZER_NAMES = ("sgd", "momentum", "adam", "adamw")


SHOWN_PROBLEMS = 20  # a longer list of problems is cut: "... and N more"
SHOWN_CHARS = 60  # a value quoted in a message is cut to this many characters


class ConfigError(Exception):
    """Bad user input: each entry of `problems` is one line naming the key, the value and what is allowed."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.shown()))

    def shown(self, limit: int = SHOWN_PROBLEMS) -> list[str]:
        """The problems as printed: the first `limit`, then '... and N more' (20,000 unknown keys are
        not 20,000 lines)."""
        if len(self.problems) <= limit:
            return self.problems
        return self.problems[:limit] + [f"... and {len(self.problems) - limit} more"]


def shorten(value: Any, limit: int = SHOWN_CHARS) -> str:
    """`value` as a message quotes it (repr for text, so control characters show as escapes), cut to
    `limit` characters with '...': a 10 MB name is not echoed whole."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


FLOAT32_MAX = 3.4028234663852886e38
NUMBERS = (int, float, int | None, float | None)  # the annotations of the config's number fields


class _Section(BaseModel):
    # allow_inf_nan=False: optim.lr=.inf is a typo, not an experiment
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        # pydantic's lax mode reads true as 1, '2' as 2 and 8.0 as 8: model.depth=true must be refused,
        # not run at depth 1, and a quoted number is text that a typo may have made
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if field is None or field.annotation not in NUMBERS:
                    continue
                whole = field.annotation in (int, int | None)
                if isinstance(value, (bool, str)) or (whole and isinstance(value, float)):
                    shown = str(value).lower() if isinstance(value, bool) else repr(value)
                    raise ValueError(f".{key}: expected {'a whole number' if whole else 'a number'} (got {shown})")
        return data

    @model_validator(mode="after")
    def _float32_sized(self) -> Any:
        # The model trains in float32 (or float64): a number float32 cannot hold (optim.lr=1e308) would
        # overflow inside torch, or in the init's arithmetic, with a traceback instead of a message.
        for key, field in type(self).model_fields.items():
            value = getattr(self, key)
            if field.annotation in (float, float | None) and value is not None and abs(value) > FLOAT32_MAX:
                raise ValueError(f".{key}: at most {FLOAT32_MAX:.4g}, the largest float32 (got {value:g})")
        return self

class DataConfig(_Section):
    name: Literal[DATASET_NAMES] = Field(  # type: ignore[valid-type]
        "digits", description="`digits`: scikit-learn's 8x8 digits, 1797 images, offline (read from scikit-learn's "
        "file without importing it, ~0.9 s saved a run); `gaussian`, `spirals`: synthetic; `mnist`, "
        "`fashion_mnist`, `cifar10`: read from their files under `data.root`; sequence tasks, made from the seed: "
        "`adding` (regression on the sum of two marked numbers), `copy` (recall `data.symbols` tokens after "
        "`data.length` blanks), `reverse`, `sort` (a token sequence, per position)")
    batch_size: int = Field(128, ge=1, description="examples per optimizer step")
    n_train: int | None = Field(None, ge=2, description="training examples, at least 2 (the inputs are "
                                                         "standardised by their spread; null: the dataset's own split; "
                                                         "digits: 80% of it, gaussian and spirals: 2048, sequence "
                                                         "tasks: 10000)")
    n_eval: int | None = Field(None, ge=1, description="held-out examples (null: the dataset's own split; "
                                                        "digits: 20% of it, gaussian and spirals: 512, sequence "
                                                        "tasks: 1000)")
    dim: int = Field(64, ge=1, description="gaussian: input size (standard-normal inputs)")
    classes: int = Field(10, ge=2, description="gaussian, spirals: number of classes")
    labels: Literal["teacher", "random"] = Field(
        "teacher", description="gaussian: `teacher`, a random one-hidden-layer tanh net labels the points; "
                               "`random`: labels drawn at random")
    noise: float = Field(0.2, ge=0, description="spirals: std of the added noise")
    length: int | None = Field(None, ge=1, le=100_000, description="sequence tasks: `adding`'s steps (default 100), "
                                                                "`copy`'s delay (default 100), `reverse`'s and `sort`'s "
                                                                "tokens (default 8)")
    vocab: int | None = Field(None, ge=2, le=100_000, description="`reverse`, `sort`: distinct tokens (default 10); "
                                                                   "`copy`: the alphabet of symbols to recall "
                                                                   "(default 8)")
    symbols: int = Field(10, ge=1, le=10_000, description="`copy`: the symbols to recall")
    root: str = Field("data", description="mnist, fashion_mnist, cifar10: the folder holding their files "
                                          "(see the docs' Configuration page, Datasets)")
    download: bool = Field(False, description="mnist, fashion_mnist, cifar10: download missing files into "
                                              "`data.root` (never unless true)")

    @model_validator(mode="after")
    def _task_keys(self) -> "DataConfig":
        # sequences.adding marks one step in each half: one step has no second half (a ValueError there)
        if self.name == "adding" and self.length is not None and self.length < 2:
            raise ValueError(f".length: at least 2 for data.name=adding, a marked step in each half (got {self.length})")
        # a key the dataset does not read would do nothing: refused, as the model's are
        used = {"length": SEQUENCE_TASKS, "vocab": ("copy", "reverse", "sort"), "symbols": ("copy",),
                "root": FILE_DATASETS, "download": FILE_DATASETS}
        for key, names in used.items():
            if self.name not in names and key in self.model_fields_set and \
                    getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f".{key}: used by data.name {', '.join(names)} only (got data.name={self.name}); "
                                 "leave it out")
        return self


_TARGET = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
BUILT_IN_KEYS = ("depth", "width", "activation", "norm", "residual", "init", "init_gain", "bias_init",
                 "recurrent_init", "recurrent_gain", "forget_bias", "heads", "norm_position", "residual_scale")
RECURRENT_KINDS = ("rnn", "lstm", "gru")
GATES = {"rnn": 1, "lstm": 4, "gru": 3}  # blocks of a cell's W_hh, one (width, width) block per gate
SEQUENCE_KINDS = RECURRENT_KINDS + ("transformer",)
MODEL_KINDS = ("mlp", "cnn") + SEQUENCE_KINDS + ("custom",)
# The keys only some kinds use, with the kinds (a key set for another kind is refused: it would do nothing).
KIND_KEYS = {
    "norm": ("mlp", "cnn"), "residual": ("mlp", "cnn"),
    "recurrent_init": RECURRENT_KINDS, "recurrent_gain": RECURRENT_KINDS, "forget_bias": ("lstm",),
    "heads": ("transformer",), "norm_position": ("transformer",), "residual_scale": ("transformer",),
}
# Each kind's defaults where the schema's (made for the 20-layer sigmoid MLP) would be wrong for it.
KIND_DEFAULTS = {
    "rnn": {"depth": 1, "activation": "tanh"},
    "lstm": {"depth": 1, "activation": "tanh"},
    "gru": {"depth": 1, "activation": "tanh"},
    "transformer": {"depth": 2, "activation": "gelu"},
}
# The activations a kind can take: a vanilla RNN cell is tanh or ReLU (torch.nn.RNNCell); the LSTM's and
# GRU's cells fix theirs; the transformer's is its MLP's.
KIND_ACTIVATIONS = {"rnn": ("tanh", "relu"), "lstm": ("tanh",), "gru": ("tanh",)}


class ModelConfig(_Section):
    kind: Literal[MODEL_KINDS] = Field(  # type: ignore[valid-type]
        "mlp", description="`mlp`: fully connected, `cnn`: conv blocks, `rnn`: a vanilla recurrent net (tanh or "
                       "ReLU), `lstm`, `gru`: gated ones, `transformer`: an encoder of self-attention blocks "
                       "(sequence tasks only: `data.name` adding, copy, reverse or sort), `custom`: your own "
                       "module, built by `model.target`")
    depth: int = Field(20, ge=1, le=1000, description="hidden layers (mlp), conv blocks (cnn), stacked recurrent "
                                                      "layers (rnn, lstm, gru: default 1) or blocks (transformer: "
                                                      "default 2)")
    width: int = Field(64, ge=1, description="units (mlp, the hidden state of rnn, lstm, gru), channels (cnn), "
                                             "model dimension (transformer)")
    activation: Literal[ACTIVATION_NAMES] = Field(  # type: ignore[valid-type]
        "sigmoid", description="the hidden layers' nonlinearity; `leaky_relu` has slope 0.01. rnn: tanh (default) "
                               "or relu; lstm, gru: tanh only (their gates fix it); transformer: its MLP's "
                               "(default gelu)")
    norm: Literal[NORM_NAMES] = Field(  # type: ignore[valid-type]
        "none", description="normalisation before each activation; `layernorm` is GroupNorm with one group "
                            "in conv blocks (mlp, cnn)")
    residual: bool = Field(False, description="identity skip around each hidden block; a bias-free linear / 1x1 "
                                              "conv projection only where the shapes differ (mlp, cnn; a "
                                              "transformer is always residual)")
    init: Literal[INIT_NAMES] = Field(  # type: ignore[valid-type]
        "default", description="weight init: `default` is PyTorch's own; `kaiming_*` (He) use the ReLU gain, "
                               "the leaky-ReLU gain for leaky_relu. rnn, lstm, gru: the input weights; "
                               "transformer: every linear map in the blocks")
    init_gain: float = Field(1.0, gt=0, description="multiplies the scheme's weights (so their std); for `normal` "
                                                    "the std is init_gain / sqrt(fan_in)")
    bias_init: Literal["default", "zero"] = Field(
        "default", description="`default` is PyTorch's own; `zero` sets the biases to 0")
    recurrent_init: Literal["default", "orthogonal", "normal"] = Field(
        "default", description="rnn, lstm, gru: the recurrent weights W_hh (each gate's block): `default` is "
                               "PyTorch's U(±1/sqrt(width)); `orthogonal` an orthogonal matrix times "
                               "`recurrent_gain`; `normal` N(0, recurrent_gain² / width), whose spectral radius is "
                               "about recurrent_gain")
    recurrent_gain: float = Field(1.0, gt=0, description="rnn, lstm, gru: the gain g of `recurrent_init` (orthogonal, "
                                                         "normal): below 1 the gradient through time vanishes; above 1 "
                                                         "a linear RNN's explodes, a ReLU RNN's above ~sqrt(2) (ReLU "
                                                         "passes about half the units)")
    forget_bias: float | None = Field(None, description="lstm: the forget gate's bias at init (null: PyTorch's, "
                                                          "about 0, so the gate starts half closed and the cell state "
                                                          "keeps ~1/2 of its gradient per step; 1 or more starts it "
                                                          "open: Gers et al. 2000, Jozefowicz et al. 2015)")
    heads: int = Field(4, ge=1, description="transformer: attention heads; `model.width` must be a multiple of it")
    norm_position: Literal["pre", "post"] = Field(
        "pre", description="transformer: LayerNorm `pre`: x + f(LN(x)), a final LN before the head; `post`: "
                           "LN(x + f(x)), the original transformer's, which needs a warm-up (Xiong et al. 2020)")
    residual_scale: Literal["none", "gpt2", "deepnet", "rezero"] = Field(
        "none", description="transformer: `gpt2` draws each branch's output projection at 1/sqrt(2 depth) of its "
                            "init; `deepnet` (post only) is DeepNorm, LN(α x + f(x)) with α = (2 depth)^(1/4) and "
                            "the branches' value and output maps at β = (8 depth)^(-1/4); `rezero`: x + a f(x) with "
                            "a learned a starting at 0, and no LayerNorm")
    target: str | None = Field(None, description="custom: `package.module:factory`, called as "
                                                 "`factory(in_shape, classes, **kwargs)`; this runs that code. The "
                                                 "keys depth to residual_scale are refused beside it")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="custom: the factory's keyword arguments")

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        # Fill the kind's own defaults for the keys not given (depth 1 for an LSTM, not the MLP's 20).
        if isinstance(data, dict) and isinstance(data.get("kind"), str) and data["kind"] in KIND_DEFAULTS:
            data = {**KIND_DEFAULTS[data["kind"]], **data}
        return data

    @model_validator(mode="after")
    def _keys_for_the_kind(self) -> "ModelConfig":
        if self.kind == "custom":
            if self.target is None:
                raise ValueError(".target: model.kind=custom needs model.target='package.module:factory'")
            if not _TARGET.fullmatch(self.target):
                raise ValueError(f".target: expected 'package.module:factory' (got {shorten(self.target)})")
            unused = [k for k in BUILT_IN_KEYS if k in self.model_fields_set]
            if unused:
                raise ValueError(f".{unused[0]}: not used by model.kind=custom (its factory builds the whole "
                                 f"model); leave out {', '.join('model.' + k for k in unused)}")
            return self
        if self.target is not None or self.kwargs:
            raise ValueError(f".target: model.target and model.kwargs are for model.kind=custom (got {self.kind})")
        for key, kinds in KIND_KEYS.items():
            if self.kind not in kinds and key in self.model_fields_set and \
                    getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(f".{key}: used by model.kind {', '.join(kinds)} only (got model.kind={self.kind}); "
                                 f"leave it out")
        if self.kind in RECURRENT_KINDS and self.recurrent_init == "default" and self.recurrent_gain != 1.0:
            raise ValueError(".recurrent_gain: scales model.recurrent_init orthogonal or normal; PyTorch's default "
                             "init has no gain (set model.recurrent_init, or leave model.recurrent_gain out)")
        allowed = KIND_ACTIVATIONS.get(self.kind)
        if allowed and self.activation not in allowed:
            raise ValueError(f".activation: model.kind={self.kind} takes {' or '.join(allowed)} (got {self.activation})")
        if self.kind == "transformer":
            if self.width % self.heads:
                raise ValueError(f".heads: model.width ({self.width}) must be a multiple of model.heads "
                                 f"(got {self.heads})")
            if self.residual_scale == "deepnet" and self.norm_position != "post":
                raise ValueError(".residual_scale: deepnet is DeepNorm, a post-LN scheme; set model.norm_position=post "
                                 "(got pre)")
            if self.residual_scale == "rezero" and self.norm_position == "post":  # it would build pre-LN's model
                raise ValueError(".norm_position: model.residual_scale=rezero has no LayerNorm to place; leave "
                                 "model.norm_position out (got post)")
        return self


class OptimConfig(_Section):
    name: Literal[OPTIMIZER_NAMES] = Field(  # type: ignore[valid-type]
        "sgd", description="the optimizer; `momentum` is SGD with momentum")
    lr: float = Field(0.1, gt=0, description="learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="for `momentum` only")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty (decoupled for `adamw`)")
    l1: float = Field(0.0, ge=0, description="L1 penalty on the weights (not biases), added to the loss")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up: step s < N trains at `optim.lr` * (s + 1) / N, "
                                                   "reaching `optim.lr` at step N - 1; at most `train.steps` "
                                                   "(0: none)")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the learning rate after warm-up: `constant` keeps `optim.lr`; `cosine` decays it "
                                "from `optim.lr` towards 0 along half a cosine, reaching 0 at step `train.steps` "
                                "(the last step trains just above 0)")


class ClipConfig(_Section):
    mode: Literal["none", "norm", "value"] = Field(
        "none", description="gradient clipping: `norm` rescales all gradients to total norm `clip.max` when above "
                            "it, `value` clamps each to ±`clip.max`")
    max: float = Field(1.0, gt=0, description="the clipping threshold")


class TrainConfig(_Section):
    steps: int = Field(300, ge=1, description="optimizer steps")
    eval_every: int = Field(100, ge=0, description="held-out loss and accuracy every N steps (0: off)")
    log_every: int = Field(10, ge=0, description="gradient and activation probes every N steps (0: off)")
    weight_every: int = Field(100, ge=0, description="weight probes (`weight_norm`, `update_ratio`, `dist_from_init`) "
                                                     "every N steps (0: off); they copy the weights (before the step, "
                                                     "and at init) and make ~11 passes over weight-sized buffers: the "
                                                     "costliest probes on a CPU")
    hist_every: int = Field(100, ge=0, description="histograms every N steps (0: off)")
    chart_layers: int | None = Field(7, ge=2, description="layers drawn as lines in TensorBoard's per-layer charts: "
                                                           "the first, the last and evenly between (null: all). "
                                                           "TensorBoard selects a folder's runs only while they are "
                                                           "500 or fewer, a layer's line being one; the profile "
                                                           "image and summary.json have every layer")
    flush_denormal: bool = Field(True, description="on the CPU, flush float32 denormals (below ~1.2e-38) to 0: they "
                                                   "make x86 arithmetic many times slower")
    threads: Literal["auto"] | int | None = Field(
        "auto", description="CPU threads torch uses for this run (summary.json's `threads`): `auto` takes 1 when a "
                            "step's forward pass is under 100 M multiply-adds, else the process's threads less the "
                            "cores other programs keep busy (the 1-minute load average), at least 1; a number sets "
                            "it; null leaves it as the process has it (torch's default, or a sweep worker's share)",
        json_schema_extra={"allowed": "auto, integer >= 1 or null"})

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        if v is None or v == "auto" or (type(v) is int and v >= 1):
            return v
        raise ValueError("expected auto, null or a number of threads >= 1")


class PretrainConfig(_Section):
    """Greedy layer-wise pre-training (Bengio et al. 2007): each hidden layer an autoencoder."""
    enabled: bool = Field(False, description="greedy layer-wise pre-training before training (mlp only)")
    method: Literal["autoencoder", "denoising"] = Field(
        "autoencoder", description="each hidden layer an autoencoder of its input; `denoising` zeroes a fraction "
                                   "`pretrain.noise` of that input first")
    noise: float = Field(0.3, ge=0, lt=1, description="denoising: fraction of each layer's input entries set to 0")
    steps: int = Field(300, ge=1, description="optimizer steps per hidden layer")
    optim: Literal[OPTIMIZER_NAMES] = Field(  # type: ignore[valid-type]
        "adam", description="the pre-training optimizer (weak plain-SGD pre-training is known to do nothing)")
    lr: float = Field(1e-3, gt=0, description="the pre-training learning rate")
    batch_size: int | None = Field(None, ge=1, description="pre-training batch size (null: `data.batch_size`)")


class DiagnosisConfig(_Section):
    vanishing_below: float = Field(1e-2, gt=0, lt=1, description="first/last gradient ratio below this: vanishing")
    exploding_above: float = Field(1e2, gt=1, description="first/last gradient ratio above this: exploding")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# What a validator allows, said once: in its error message and in `gradexp keys` (a field's "allowed").
NAME_RULE = "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
DEVICE_RULE = "auto, cpu, cuda or cuda:N"


class Config(_Section):
    name: str = Field("experiment", description="run name: the folder under `--out`",
                      json_schema_extra={"allowed": NAME_RULE})
    seed: int = Field(0, ge=0, lt=2**32, description="seeds the init, the data split and synthetic data, and batch "
                                                      "order (torch's generator keeps 32 bits: 2^32 would be seed 0)",
                      json_schema_extra={"allowed": "integer in [0, 4294967295]"})
    device: str = Field("auto", description="`auto`: CUDA when present, else the CPU",
                        json_schema_extra={"allowed": DEVICE_RULE})
    precision: Literal["float32", "float64"] = Field(
        "float32", description="float64 measures gradients that float32 rounds to exactly 0 (a 60-layer sigmoid "
                               "net's first layers), at several times the cost")
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

    @model_validator(mode="after")
    def _model_fits_the_data(self) -> "Config":
        sequence_data = self.data.name in SEQUENCE_TASKS
        if self.model.kind in SEQUENCE_KINDS and not sequence_data:
            raise ValueError(f"model.kind: {self.model.kind} needs a sequence task, data.name one of "
                             f"{', '.join(SEQUENCE_TASKS)} (got data.name={self.data.name})")
        if self.model.kind == "cnn" and sequence_data:
            raise ValueError(f"model.kind: cnn needs images (got data.name={self.data.name}); for a sequence task use "
                             f"{', '.join(SEQUENCE_KINDS)}")
        if self.model.kind == "custom" and self.data.name in ("copy", "reverse", "sort"):
            raise ValueError(f"model.kind: a custom model gets (in_shape, classes) and returns logits (N, classes), one "
                             f"answer per example; {self.data.name} asks one per position (use data.name=adding, or "
                             f"gradexp.watch in your own loop)")
        if self.model.kind == "mlp" and self.data.name in ("copy", "reverse", "sort"):
            raise ValueError(f"model.kind: an mlp gives one answer per example and {self.data.name} asks one per "
                             f"position; use {', '.join(SEQUENCE_KINDS)}")
        return self

    @model_validator(mode="after")
    def _warmup_within_training(self) -> "Config":
        if self.optim.warmup_steps > self.train.steps:
            raise ValueError(f"optim.warmup_steps: at most train.steps ({self.train.steps}), the steps there are to "
                             f"warm up over (got {self.optim.warmup_steps})")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes a folder under --out: it must not be able to escape it.
        if not _NAME.fullmatch(v) or len(v) > 100:  # fullmatch: '$' would let a trailing newline through
            raise ValueError(f"must be {NAME_RULE}")
        return v

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:[0-9]+", v):
            raise ValueError(f"must be {DEVICE_RULE}")
        return v
