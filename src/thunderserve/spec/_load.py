"""YAML/JSON loading with one-line errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from thunderserve.errors import SpecError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path) -> Any:
    """Parse a YAML (or JSON) file; malformed input becomes a SpecError naming the file and line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError("file not found", source=str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read file ({exc.strerror})", source=str(path)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SpecError(f"malformed YAML{line}: {problem}", source=str(path)) from None


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(field path, message) of a pydantic error, readable for humans."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return loc, msg


def validate_as(model: type[M], data: Any, source: str) -> M:
    """Validate raw data into a frozen spec model, mapping errors to a SpecError."""
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping at the top level, got {type(data).__name__}", source=source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        field, msg = first_error(exc)
        raise SpecError(msg, source=source, field=field) from None
