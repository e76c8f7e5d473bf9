"""Protocol, method and SLURM presets, written once as YAML under ``configs/presets/`` and validated on load.

Each preset is one file ``configs/presets/<name>.yaml`` of one of three kinds:

- ``protocol``: the datasets trained on, the datasets evaluated without training
  (``targets``), the seeds and shot counts, which classes are trained and tested, and
  which table of ``capt_lib.evaluation.tables`` summarises the runs;
- ``method``: the settings of one method in sections (``backbone``, ``train``, and for
  CAPT ``bank`` and ``model``), rules that change them for a protocol, dataset or shot
  count, and the source of each value;
- ``slurm``: the resources that ``capt sweep --backend slurm`` requests per task.

Every section of a method maps to a config dataclass of the library (``BackboneConfig``,
``CAPTConfig``, ``CAPTTrainConfig``, ``CoOpConfig``, or ``PromptSRCSettings`` below), so a
misspelled key is an error that names the file and the key. ``resolve_run_settings``
merges a protocol, a method, one (dataset, seed) and the caller's overrides into the full
settings of a run: every field of those dataclasses, plus the presets used and the code
revision. A notebook stores them in its results.json, next to its metrics.

The presets folder is ``configs/presets`` of the repository that contains this package,
or the folder named by the environment variable ``CAPT_PRESETS_DIR``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

logger = logging.getLogger(__name__)

# NOTE: a non-editable install does not contain configs/, so set CAPT_PRESETS_DIR or pass directory=.
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"
PRESETS_DIR_ENV = "CAPT_PRESETS_DIR"

PRESET_KINDS = ("protocol", "method", "slurm")
CLASS_SPLITS = ("base_to_novel", "all")  # train on the first ceil(n/2) classes and test both halves, or use all classes
TABLES = ("base_to_novel", "cross_dataset", "domain_generalization", "few_shot")
TRAINERS = ("capt", "coop", "promptsrc")
RULE_CONDITIONS = ("protocol", "dataset", "shots")
SETTINGS_FROM_ARGUMENTS = ("protocol", "method", "dataset", "seed")  # fixed by resolve_run_settings' arguments

PROTOCOL_FIELDS = {
    "kind": str,
    "name": str,
    "description": str,
    "source": str,
    "datasets": list,
    "targets": list,
    "seeds": list,
    "shots": list,
    "classes": str,
    "table": str,
}
METHOD_FIELDS = {
    "kind": str,
    "name": str,
    "description": str,
    "trainer": str,
    "implemented": bool,
    "missing": str,
    "settings": dict,
    "rules": list,
    "sources": dict,
}
METHOD_OPTIONAL_FIELDS = ("missing", "rules", "sources")
RULE_FIELDS = ("when", "set", "source")
SLURM_HEADER_FIELDS = {"kind": str, "name": str, "description": str}


@dataclass(frozen=True)
class BankSettings:
    """Settings of the Confusion Bank that a CAPT run builds."""

    base_model: str = "zero_shot"  # model whose mistakes fill the bank: "zero_shot" CLIP or "coop" (CoOp-tuned prompts)


@dataclass(frozen=True)
class PromptSRCSettings:
    """Settings of PromptSRC-style deep prompts (text and vision), kept as data.

    The deep-prompt learner itself is not part of capt yet. The field names mirror
    PromptSRC's config keys in lower case.
    """

    n_ctx_text: int = 4  # learned context tokens on the text side
    n_ctx_vision: int = 4  # learned context tokens on the vision side
    ctx_init: str | None = "a photo of a"  # text whose embeddings start the text context
    prompt_depth_text: int = 9  # text-encoder layers that receive deep prompts
    prompt_depth_vision: int = 9  # vision-encoder layers that receive deep prompts
    text_loss_weight: float = 25.0  # weight of the L1 consistency loss on text features
    image_loss_weight: float = 10.0  # weight of the L1 consistency loss on image features
    gpa_mean: float = 15.0  # mean epoch of the Gaussian weights that aggregate prompts over epochs
    gpa_std: float = 1.0  # standard deviation, in epochs, of those Gaussian weights
    epochs: int = 20  # passes over the few-shot training split
    batch_size: int = 4  # images per step
    optimizer: str = "sgd"  # optimizer name
    lr: float = 0.0025  # peak learning rate of the cosine schedule
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    warmup_epochs: int = 1  # epochs at the constant warmup_lr before the cosine schedule
    warmup_lr: float = 1e-5  # learning rate during warmup
    seed: int = 0  # seed of initialisation and shuffling


def presets_dir(directory: str | os.PathLike | None = None) -> Path:
    """Return the presets folder: ``directory``, else $CAPT_PRESETS_DIR, else ``configs/presets``."""
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get(PRESETS_DIR_ENV) or PRESETS_DIR)


def preset_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Return the file of preset ``name``, raising FileNotFoundError with the available names."""
    path = presets_dir(directory) / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"preset {name!r} not found: {path} does not exist; available presets: {list_presets(directory=directory)}"
        )
    return path


def list_presets(kind: str | None = None, *, directory: str | os.PathLike | None = None) -> list[str]:
    """Return the sorted names of the presets, only those of ``kind`` when it is given."""
    if kind is not None and kind not in PRESET_KINDS:
        raise ValueError(f"kind={kind!r} is invalid; choose one of {list(PRESET_KINDS)}")
    folder = presets_dir(directory)
    names = sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []
    if kind is None:
        return names
    return [name for name in names if _read_yaml(folder / f"{name}.yaml").get("kind") == kind]


def load_preset(name: str, *, directory: str | os.PathLike | None = None) -> dict:
    """Read and validate preset ``name``, returning its content as a dict.

    Raises FileNotFoundError for an unknown name, RuntimeError for a file that is not
    valid YAML, and ValueError naming the file and the key for any other problem.
    """
    path = preset_path(name, directory)
    preset = _read_yaml(path)

    kind = preset.get("kind")
    if kind not in PRESET_KINDS:
        raise ValueError(f"{path}: kind={kind!r} is invalid; choose one of {list(PRESET_KINDS)}")
    if preset.get("name") != name:
        raise ValueError(f"{path}: name={preset.get('name')!r} must equal the file name {name!r}")

    if kind == "protocol":
        _validate_protocol(preset, path)
    elif kind == "method":
        _validate_method(preset, path)
    else:
        _validate_slurm(preset, path)
    return preset


def resolve_run_settings(
    protocol: str,
    method: str,
    dataset: str,
    seed: int,
    overrides: Mapping[str, Any] | None = None,
    *,
    allow_not_implemented: bool = False,
    directory: str | os.PathLike | None = None,
) -> dict:
    """Return the full settings of one run: protocol and method presets, rules, overrides and defaults.

    ``overrides`` may set ``shots`` and any key of the method's sections, either nested
    (``{"train": {"lr": 0.01}}``) or dotted (``{"train.lr": 0.01}``). A protocol with
    several shot counts needs ``shots`` there. Rules of the method apply in file order
    before the overrides. Each section is completed with the defaults of its dataclass,
    and ``train.seed`` is set to ``seed`` when the trainer has one. ``provenance`` records
    the preset files, the rules applied, the overrides, the sources of the values and the
    git revision of the code.

    Raises NotImplementedError for a method preset marked ``implemented: false`` (unless
    ``allow_not_implemented``), and ValueError for unknown keys or invalid values.
    """
    from capt_lib.runs.papermill_runner import git_state  # one git probe shared with the run records

    protocol_preset = _load_kind(protocol, "protocol", directory)
    method_preset = _load_kind(method, "method", directory)
    method_file = preset_path(method, directory)
    if not method_preset["implemented"] and not allow_not_implemented:
        raise NotImplementedError(
            f"method {method!r} ({method_file}) is marked not implemented: {method_preset.get('missing', '')} "
            "Its settings are kept as data only; choose an implemented method from "
            f"{[name for name in list_presets('method', directory=directory) if name != method]}"
        )

    nested_overrides = _nest_overrides(overrides or {}, method_file, method_preset["trainer"])
    shots = _choose_shots(protocol_preset, nested_overrides.pop("shots", None), preset_path(protocol, directory))
    if dataset not in protocol_preset["datasets"]:
        logger.info(
            "dataset %r is not one of the %s protocol's datasets %s; the settings are resolved all the same",
            dataset, protocol, protocol_preset["datasets"],
        )

    sections = copy.deepcopy(method_preset["settings"])
    applied_rules = []
    for index, rule in enumerate(method_preset.get("rules", [])):
        if _rule_matches(rule["when"], protocol=protocol, dataset=dataset, shots=shots):
            _deep_update(sections, rule["set"])
            applied_rules.append({"index": index, "when": rule["when"], "source": rule.get("source")})
    _deep_update(sections, nested_overrides)

    completed = _complete_sections(sections, method_preset["trainer"], seed, method_file)
    git_revision, git_dirty = git_state(Path(__file__).resolve().parent)
    overridden = set(_dotted_keys(nested_overrides))
    return {
        "protocol": protocol,
        "method": method,
        "dataset": dataset,
        "seed": int(seed),
        "shots": shots,
        "classes": protocol_preset["classes"],
        "targets": list(protocol_preset["targets"]),
        "trainer": method_preset["trainer"],
        **completed,
        "provenance": {
            "protocol_preset": str(preset_path(protocol, directory)),
            "method_preset": str(method_file),
            "rules_applied": applied_rules,
            "overrides": dict(overrides or {}),
            "sources": {key: text for key, text in method_preset.get("sources", {}).items() if key not in overridden},
            "git_revision": git_revision,
            "git_dirty": git_dirty,
        },
    }


def trainer_sections(trainer: str) -> dict[str, type]:
    """Return the settings sections of ``trainer`` and the dataclass that validates each one."""
    from capt_lib.backbones.loading import BackboneConfig

    if trainer == "capt":
        from capt_lib.modules.capt_model import CAPTConfig
        from capt_lib.training.capt_trainer import CAPTTrainConfig

        return {"backbone": BackboneConfig, "bank": BankSettings, "model": CAPTConfig, "train": CAPTTrainConfig}
    if trainer == "coop":
        from capt_lib.training.coop_trainer import CoOpConfig

        return {"backbone": BackboneConfig, "train": CoOpConfig}
    if trainer == "promptsrc":
        # NOTE: PromptSRCSettings replaces the config of a deep-prompt learner, which capt lacks.
        return {"backbone": BackboneConfig, "train": PromptSRCSettings}
    raise ValueError(f"trainer={trainer!r} is invalid; choose one of {list(TRAINERS)}")


def _load_kind(name: str, kind: str, directory) -> dict:
    preset = load_preset(name, directory=directory)
    if preset["kind"] != kind:
        raise ValueError(
            f"preset {name!r} is a {preset['kind']} preset, not a {kind} preset; "
            f"{kind} presets: {list_presets(kind, directory=directory)}"
        )
    return preset


def _read_yaml(path: Path) -> dict:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RuntimeError(f"could not parse preset {path}: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"{path}: a preset must be a YAML mapping, got {type(content).__name__}")
    return content


def _check_fields(preset: Mapping, fields: Mapping[str, type], optional: tuple, path: Path, where: str = "") -> None:
    """Raise ValueError for unknown, missing or wrongly typed top-level keys."""
    prefix = f"{where}." if where else ""
    unknown = sorted(set(preset) - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown key {prefix}{unknown[0]}; valid keys: {sorted(fields)}")
    missing = sorted(set(fields) - set(preset) - set(optional))
    if missing:
        raise ValueError(f"{path}: missing key {prefix}{missing[0]}; required keys: {sorted(set(fields) - set(optional))}")
    for key, expected in fields.items():
        if key in preset and not isinstance(preset[key], expected):
            raise ValueError(
                f"{path}: {prefix}{key} must be a {expected.__name__}, got {type(preset[key]).__name__} {preset[key]!r}"
            )


def _validate_protocol(preset: dict, path: Path) -> None:
    _check_fields(preset, PROTOCOL_FIELDS, (), path)
    for key in ("datasets", "targets"):
        if not all(isinstance(name, str) and name for name in preset[key]):
            raise ValueError(f"{path}: {key} must be a list of dataset names, got {preset[key]!r}")
    if not preset["datasets"]:
        raise ValueError(f"{path}: datasets is empty; list the datasets the protocol trains on")
    for key in ("seeds", "shots"):
        values = preset[key]
        if not values or not all(isinstance(value, int) and not isinstance(value, bool) for value in values):
            raise ValueError(f"{path}: {key} must be a non-empty list of integers, got {values!r}")
        if len(set(values)) != len(values):
            raise ValueError(f"{path}: {key} lists a value twice: {values!r}")
    if any(shots < 1 for shots in preset["shots"]):
        raise ValueError(f"{path}: shots must be positive, got {preset['shots']!r}")
    if preset["classes"] not in CLASS_SPLITS:
        raise ValueError(f"{path}: classes={preset['classes']!r} is invalid; choose one of {list(CLASS_SPLITS)}")
    if preset["table"] not in TABLES:
        raise ValueError(f"{path}: table={preset['table']!r} is invalid; choose one of {list(TABLES)}")


def _validate_method(preset: dict, path: Path) -> None:
    _check_fields(preset, METHOD_FIELDS, METHOD_OPTIONAL_FIELDS, path)
    if preset["trainer"] not in TRAINERS:
        raise ValueError(f"{path}: trainer={preset['trainer']!r} is invalid; choose one of {list(TRAINERS)}")
    if not preset["implemented"] and not preset.get("missing"):
        raise ValueError(f"{path}: a method with implemented: false needs `missing`, saying what is not implemented")

    sections = trainer_sections(preset["trainer"])
    _check_sections(preset["settings"], sections, path, "settings")
    for index, rule in enumerate(preset.get("rules", [])):
        _validate_rule(rule, sections, path, f"rules[{index}]")
    for key in preset.get("sources", {}):
        _check_dotted_key(key, sections, path, "sources")


def _validate_rule(rule: Any, sections: Mapping[str, type], path: Path, where: str) -> None:
    if not isinstance(rule, dict):
        raise ValueError(f"{path}: {where} must be a mapping with `when` and `set`, got {rule!r}")
    unknown = sorted(set(rule) - set(RULE_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown key {where}.{unknown[0]}; valid keys: {list(RULE_FIELDS)}")
    for key in ("when", "set"):
        if not isinstance(rule.get(key), dict) or not rule[key]:
            raise ValueError(f"{path}: {where}.{key} must be a non-empty mapping, got {rule.get(key)!r}")
    unknown = sorted(set(rule["when"]) - set(RULE_CONDITIONS))
    if unknown:
        raise ValueError(f"{path}: unknown key {where}.when.{unknown[0]}; valid conditions: {list(RULE_CONDITIONS)}")
    _check_sections(rule["set"], sections, path, f"{where}.set")


def _validate_slurm(preset: dict, path: Path) -> None:
    from capt_lib.runs.slurm import SlurmSettings

    fields = {**SLURM_HEADER_FIELDS, **{field.name: object for field in dataclasses.fields(SlurmSettings)}}
    _check_fields(preset, fields, tuple(field.name for field in dataclasses.fields(SlurmSettings)), path)
    try:
        SlurmSettings(**{key: value for key, value in preset.items() if key not in SLURM_HEADER_FIELDS})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def _check_sections(values: Any, sections: Mapping[str, type], path: Path, where: str) -> None:
    """Check that ``values`` only names known sections and, inside them, known dataclass fields."""
    if not isinstance(values, dict):
        raise ValueError(f"{path}: {where} must be a mapping, got {values!r}")
    for name, section_values in values.items():
        if name not in sections:
            raise ValueError(f"{path}: unknown key {where}.{name}; valid sections: {sorted(sections)}")
        _check_config_keys(section_values, sections[name], path, f"{where}.{name}")
    if isinstance(values.get("train"), dict) and "seed" in values["train"]:
        raise ValueError(f"{path}: {where}.train.seed must not be set; resolve_run_settings sets it to the run's seed")


def _check_config_keys(values: Any, config_class: type, path: Path, where: str) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{path}: {where} must be a mapping, got {values!r}")
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{path}: unknown key {where}.{key}; valid keys: {sorted(fields)}")
        default = _field_default(fields[key])
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            _check_config_keys(value, type(default), path, f"{where}.{key}")


def _check_dotted_key(key: str, sections: Mapping[str, type], path: Path, where: str) -> None:
    parts = key.split(".")
    if parts[0] not in sections:
        raise ValueError(f"{path}: unknown key {where}.{key}; it must start with one of {sorted(sections)}")
    config_class: Any = sections[parts[0]]
    for depth, part in enumerate(parts[1:], start=1):
        fields = {field.name: field for field in dataclasses.fields(config_class)} if config_class else {}
        if part not in fields:
            raise ValueError(f"{path}: unknown key {where}.{key}; {'.'.join(parts[:depth])} has keys {sorted(fields)}")
        default = _field_default(fields[part])
        config_class = type(default) if dataclasses.is_dataclass(default) else None
    if len(parts) == 1:
        raise ValueError(f"{path}: {where}.{key} names a whole section; name a key inside it, e.g. {key}.<key>")


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _nest_overrides(overrides: Mapping[str, Any], method_file: Path, trainer: str) -> dict:
    """Turn dotted keys such as ``train.lr`` into nested dicts and check every key."""
    sections = trainer_sections(trainer)
    nested: dict = {}
    for key, value in overrides.items():
        if key in SETTINGS_FROM_ARGUMENTS:
            raise ValueError(f"overrides must not set {key!r}; it is an argument of resolve_run_settings")
        if key == "shots":
            nested["shots"] = value
            continue
        parts = key.split(".")
        if len(parts) > 1:
            _check_dotted_key(key, sections, method_file, "overrides")
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        if isinstance(value, dict) and isinstance(target.get(parts[-1]), dict):
            _deep_update(target[parts[-1]], value)
        else:
            target[parts[-1]] = copy.deepcopy(value)
    _check_sections({name: value for name, value in nested.items() if name != "shots"}, sections, method_file, "overrides")
    return nested


def _choose_shots(protocol: dict, requested: Any, path: Path) -> int:
    valid = protocol["shots"]
    if requested is None:
        if len(valid) > 1:
            raise ValueError(
                f"protocol {protocol['name']!r} ({path}) runs several shot counts {valid}; pass overrides={{'shots': K}}"
            )
        return valid[0]
    if requested not in valid:
        raise ValueError(f"shots={requested!r} is invalid for protocol {protocol['name']!r} ({path}); choose one of {valid}")
    return int(requested)


def _rule_matches(when: Mapping[str, Any], **run: Any) -> bool:
    for key, expected in when.items():
        allowed = expected if isinstance(expected, list) else [expected]
        if run[key] not in allowed:
            return False
    return True


def _deep_update(target: dict, changes: Mapping[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _dotted_keys(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            keys += _dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def _complete_sections(sections: dict, trainer: str, seed: int, method_file: Path) -> dict:
    """Build each section's dataclass (which validates the values) and return them as dicts."""
    completed = {}
    for name, config_class in trainer_sections(trainer).items():
        values = dict(sections.get(name, {}))
        field_names = {field.name for field in dataclasses.fields(config_class)}
        if name == "train" and "seed" in field_names:
            values["seed"] = int(seed)
        instance = _build_config(config_class, values, method_file, name)
        completed[name] = dataclasses.asdict(instance)
    return completed


def _build_config(config_class: type, values: Mapping[str, Any], path: Path, where: str, base: Any = None) -> Any:
    """Create ``config_class`` from ``values``, merging nested mappings into the default sub-configs."""
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    arguments = {}
    for key, value in values.items():
        start = getattr(base, key) if base is not None else _field_default(fields[key])
        if dataclasses.is_dataclass(start) and isinstance(value, Mapping):
            arguments[key] = _build_config(type(start), value, path, f"{where}.{key}", base=start)
        else:
            arguments[key] = tuple(value) if isinstance(start, tuple) and isinstance(value, list) else value
    try:
        if base is not None:
            return dataclasses.replace(base, **arguments)
        return config_class(**arguments)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid {where} settings {dict(values)}: {e}") from e
