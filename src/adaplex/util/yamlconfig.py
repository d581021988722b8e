"""Loading YAML configs into pydantic models with one-line errors that name the field and file."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from adaplex.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)


def validation_message(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"{source}: field {where!r}: {first['msg']}"


def read_yaml(path: Path) -> dict:
    """The mapping a YAML config file holds, or a one-line error."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; give a YAML config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of fields")
    return data


def validate(data: dict, model: type[Model], source: str) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(validation_message(err, source)) from None


def load_yaml(path: Path, model: type[Model]) -> Model:
    return validate(read_yaml(path), model, str(path))
