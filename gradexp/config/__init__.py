"""The experiment config: one typed schema, defaults in code, YAML over them, overrides over that.

schema (the pydantic models and the names they allow) | load (strict YAML, `key.path=value` overrides,
validation into one readable line per problem) | keys (every key described, for `gradexp keys` and the
docs). `load_config` is the one way in."""

from gradexp.config.keys import (
    KeyDoc,
    key_docs,
    key_labels,
    keys_markdown,
    keys_table,
    value_text,
    yaml_text,
)
from gradexp.config.load import (
    MAX_DEPTH,
    Loader,
    apply_overrides,
    flat,
    flatten,
    load_config,
    parse_overrides,
    read_yaml,
    set_key,
    to_yaml,
    validate,
    yaml_load,
    yaml_scalar,
)
from gradexp.config.schema import (
    ACTIVATION_NAMES,
    BUILT_IN_KEYS,
    DATASET_NAMES,
    DEVICE_RULE,
    FLOAT32_MAX,
    GATES,
    INIT_NAMES,
    KIND_ACTIVATIONS,
    KIND_DEFAULTS,
    KIND_KEYS,
    MODEL_KINDS,
    NAME_RULE,
    NORM_NAMES,
    OPTIMIZER_NAMES,
    RECURRENT_KINDS,
    SEQUENCE_KINDS,
    SEQUENCE_TASKS,
    SHOWN_CHARS,
    SHOWN_PROBLEMS,
    ClipConfig,
    Config,
    ConfigError,
    DataConfig,
    DiagnosisConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    TrainConfig,
    shorten,
)

__all__ = ['ACTIVATION_NAMES', 'NORM_NAMES', 'INIT_NAMES', 'DATASET_NAMES', 'SEQUENCE_TASKS', 'OPTIMIZER_NAMES', 'SHOWN_PROBLEMS', 'SHOWN_CHARS', 'ConfigError', 'shorten', 'FLOAT32_MAX', 'DataConfig', 'BUILT_IN_KEYS', 'RECURRENT_KINDS', 'GATES', 'SEQUENCE_KINDS', 'MODEL_KINDS', 'KIND_KEYS', 'KIND_DEFAULTS', 'KIND_ACTIVATIONS', 'ModelConfig', 'OptimConfig', 'ClipConfig', 'TrainConfig', 'PretrainConfig', 'DiagnosisConfig', 'NAME_RULE', 'DEVICE_RULE', 'Config', 'Loader', 'MAX_DEPTH', 'yaml_load', 'yaml_scalar', 'set_key', 'flatten', 'parse_overrides', 'apply_overrides', 'validate', 'read_yaml', 'load_config', 'to_yaml', 'flat', 'KeyDoc', 'yaml_text', 'key_docs', 'keys_markdown', 'keys_table', 'value_text', 'key_labels']
