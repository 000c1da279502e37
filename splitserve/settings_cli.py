"""Process settings from flags, SPLITSERVE_* environment variables and a YAML/JSON file, one name for each.

A setting ``num_kv_blocks`` is the flag ``--num-kv-blocks``, the variable ``SPLITSERVE_NUM_KV_BLOCKS`` and the
key ``num_kv_blocks`` of the ``--config`` file (or of the file named by ``SPLITSERVE_CONFIG``). Precedence:
flag > environment > file > default. A bad value in any of them is a SettingsError with a one-line message
that names the setting as it was given (``--chunk-size: ...``, ``SPLITSERVE_CHUNK_SIZE: ...``,
``chunk_size in cfg.yaml: ...``). No torch here: the gateway imports this module.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "SPLITSERVE_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
_CONFIG_DEST = "config_file"

S = TypeVar("S", bound="ProcessSettings")
_EPILOG = ("Each setting comes from its flag, else its SPLITSERVE_<NAME> environment variable, else the --config "
           "file, else its default. A bad value stops the process with one line and exit status 2.")


class SettingsError(ValueError):
    """A bad flag, variable, file or value; its message is one line."""


class ProcessSettings(BaseSettings):
    """Base of one process's settings: frozen, unknown keys refused, SPLITSERVE_* variables read.

    Built in code (``GatewaySettings(model=...)``) it reads keyword arguments > environment > defaults;
    ``load_settings`` adds the flags on top and the ``--config`` file below the environment.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="forbid", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_names(settings_cls: type[ProcessSettings]) -> set[str]:
    """Every SPLITSERVE_* variable this process reads: one per setting, plus SPLITSERVE_CONFIG."""
    return {env_name(name) for name in settings_cls.model_fields} | {CONFIG_ENV}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise SettingsError(message)


def build_parser(settings_cls: type[ProcessSettings], prog: str, description: str,
                 groups: Sequence[tuple[str, Sequence[str]]] = ()) -> argparse.ArgumentParser:
    """One flag per setting, grouped as ``groups`` says (the rest under "settings"); flags not given stay
    out of the parsed namespace. ``--help`` shows each setting's default and variable."""
    parser = _Parser(prog=prog, description=description, epilog=_EPILOG)
    parser.add_argument("--config", dest=_CONFIG_DEST, metavar="FILE", default=argparse.SUPPRESS,
                        help=f"YAML or JSON file of settings, keys as named below (env {CONFIG_ENV})")
    grouped = [name for _, names in groups for name in names]
    rest = [name for name in settings_cls.model_fields if name not in grouped]
    for title, names in [*groups, ("settings", rest)]:
        if not names:
            continue
        group = parser.add_argument_group(title)
        for name in names:
            _add_flag(group, name, settings_cls.model_fields[name])
    return parser


def _add_flag(group: argparse._ArgumentGroup, name: str, field: Any) -> None:
    default = "required" if field.is_required() else f"default: {_shown(field.default)}"
    text = f"{field.description or name} ({default}; env {env_name(name)})".replace("%", "%%")
    kind = _unwrap_optional(field.annotation)
    if kind is bool:
        group.add_argument(flag_name(name), dest=name, nargs="?", const="true", metavar="{true,false}",
                           default=argparse.SUPPRESS, help=text)
    else:
        group.add_argument(flag_name(name), dest=name, metavar=_metavar(kind), default=argparse.SUPPRESS, help=text)


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _metavar(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    return {int: "N", float: "X", Path: "PATH"}.get(kind, "TEXT")


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if value == "":
        return '""'
    return str(value).lower() if isinstance(value, bool) else str(value)


def load_settings(settings_cls: type[S], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> S:
    """Flags > SPLITSERVE_* environment > --config file > defaults -> validated settings, or SettingsError."""
    flags = vars(parser.parse_args(argv))
    given_as = "--config" if _CONFIG_DEST in flags else CONFIG_ENV
    config = flags.pop(_CONFIG_DEST, None) or os.environ.get(CONFIG_ENV) or None
    file_values = read_config_file(config, given_as) if config else {}
    sources = (InitSettingsSource(settings_cls, flags), EnvSettingsSource(settings_cls),
               InitSettingsSource(settings_cls, file_values))
    try:
        return settings_cls(_build_sources=(sources, {}))  # type: ignore[call-arg]
    except ValidationError as e:
        where = _Where(flags, file_values, config)
        raise SettingsError("; ".join(where.describe(err) for err in e.errors(include_url=False))) from None


def read_config_file(path: str | os.PathLike[str], given_as: str = "--config") -> dict[str, Any]:
    """The mapping in a .json, .yaml or .yml file; SettingsError (one line) if it is missing or malformed."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise SettingsError(f"{given_as} {path}: the file must end in .json, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SettingsError(f"{given_as} {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else _load_yaml(text)
    except ValueError as e:
        raise SettingsError(f"{given_as} {path}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{given_as} {path}: must hold a mapping of settings, not a {type(data).__name__}")
    return data


def _load_yaml(text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ValueError("reading YAML needs PyYAML (pip install pyyaml), or use a .json file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


class _Where:
    """Names a setting as the user gave it, following the precedence: flag, variable, file key, name."""

    def __init__(self, flags: Mapping[str, Any], file_values: Mapping[str, Any], config: str | None) -> None:
        self.flags, self.file_values, self.config = flags, file_values, config

    def source(self, name: str) -> str:
        if name in self.flags:
            return flag_name(name)
        if os.environ.get(env_name(name)):
            return env_name(name)
        if name in self.file_values:
            return f"{name} in {self.config}"
        return name

    def describe(self, err: Mapping[str, Any]) -> str:
        message = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"]:
            return message
        name = str(err["loc"][0])
        if err["type"] == "missing":
            return f"{name}: required: give {flag_name(name)}, {env_name(name)} or {name} in the --config file"
        if err["type"] == "extra_forbidden":
            return f"{self.source(name)}: not a setting of this process"
        given = "" if f"got {err['input']}" in message else f" (got {err['input']!r})"
        return f"{self.source(name)}: {message}{given}"
