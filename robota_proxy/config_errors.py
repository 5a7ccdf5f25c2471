"""Configuration mistakes as one line each: the variable, the value, what is accepted.

An operator who typed ``ROBOTA_PORT=abc`` should read ``ROBOTA_PORT is 'abc': expected a whole
number``, not fifty lines of pydantic traceback. Everything here turns an exception about the
settings into a ``ConfigError`` whose message is that line; the command line prints it and
exits with status 2 (the usual status of a usage error).

Secrets never reach the line: a ``SecretStr`` field, or any field whose name mentions a key or
a secret, is shown as ``<hidden>``, and passwords inside URLs are masked.
"""

from __future__ import annotations

import os
import re
from typing import Any, get_args

from pydantic import AliasChoices, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsError

from robota_proxy.settings import Settings

HIDDEN = "<hidden>"
#: Longer values are cut: the line is for recognising the value, not for reading it back.
_MAX_SHOWN = 80

_PASSWORD_IN_URL = re.compile(r"(?<=:)[^:@/]+(?=@)")
_FIELD_IN_SETTINGS_ERROR = re.compile(r'field "([^"]+)"')


class ConfigError(Exception):
    """A setting that cannot work; ``str()`` is the one line to print."""


def redact_url(url: str) -> str:
    """``postgresql://u:pw@h/db`` -> ``postgresql://u:***@h/db``; works on URLs no parser
    accepts, because the bad ones are exactly those printed in an error."""
    return _PASSWORD_IN_URL.sub("***", url)


def env_name(field: str) -> str:
    """The variable that sets ``field``: the alias in use (``OPENAI_API_KEY``) when one is
    set, else the first alias, else ``ROBOTA_<FIELD>``."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        names = [str(choice) for choice in alias.choices if isinstance(choice, str)]
        for name in names:
            if name in os.environ:
                return name
        if names:
            return names[0]
    if isinstance(alias, str):
        return alias
    return f"ROBOTA_{field.upper()}"


def is_secret(field: str) -> bool:
    info = Settings.model_fields.get(field)
    lowered = field.lower()
    return "key" in lowered or "secret" in lowered or (info is not None and _holds_secret(info))


def _holds_secret(info: FieldInfo) -> bool:
    return _mentions_secret(info.annotation)


def _mentions_secret(annotation: Any) -> bool:
    """``SecretStr``, ``SecretStr | None``, ``list[SecretStr]``, ``Annotated[...]``..."""
    if annotation is SecretStr:
        return True
    return any(_mentions_secret(arg) for arg in get_args(annotation))


def shown(field: str, value: Any) -> str:
    """How a value of ``field`` may appear in an error line."""
    if is_secret(field):
        return HIDDEN
    text = value if isinstance(value, str) else repr(value)
    if "url" in field.lower() and isinstance(text, str):
        text = redact_url(text)
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return repr(text)


def _field_and_variable(location: tuple[int | str, ...]) -> tuple[str, str]:
    """pydantic reports a field by name, or by the alias that carried the value (which is
    then the variable to name): map both back to the field."""
    head = str(location[0]) if location else ""
    if head in Settings.model_fields:
        return head, env_name(head)
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
        if any(isinstance(choice, str) and choice.upper() == head.upper() for choice in choices):
            return name, head.upper()
    return head.lower(), head.upper()


def _accepted(error: ErrorDetails) -> str:
    """pydantic's sentence, turned round to say what would have been accepted."""
    kind, context = error["type"], error.get("ctx") or {}
    bounds = {
        "greater_than": "must be greater than {gt}",
        "greater_than_equal": "must be at least {ge}",
        "less_than": "must be less than {lt}",
        "less_than_equal": "must be at most {le}",
    }
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "expected a whole number"
    if kind in ("float_parsing", "float_type"):
        return "expected a number"
    if kind in ("bool_parsing", "bool_type"):
        return "expected true or false (also 1/0, yes/no, on/off)"
    if kind == "literal_error":
        return f"expected {context.get('expected', '')}".rstrip()
    if kind in ("dict_type", "json_invalid"):
        return "expected a JSON object"
    if kind in ("list_type",):
        return "expected a comma-separated list"
    if kind in bounds:
        return bounds[kind].format(**{k: _number(v) for k, v in context.items()})
    return str(error["msg"]).removeprefix("Value error, ")


def _number(value: Any) -> Any:
    """``60.0`` -> ``60``: the bound as an operator would write it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def from_validation_error(exc: ValidationError) -> ConfigError:
    """One line per invalid field; the raw text of the variable when it is in the
    environment (what the operator typed), else the value pydantic saw."""
    lines = []
    for error in exc.errors():
        field, name = _field_and_variable(error["loc"])
        raw = os.environ.get(name, error.get("input"))
        lines.append(f"{name} is {shown(field, raw)}: {_accepted(error)}")
    return ConfigError("\n".join(dict.fromkeys(lines)))


def from_settings_error(exc: SettingsError) -> ConfigError:
    """pydantic-settings' own error: a JSON-valued variable that is not JSON."""
    found = _FIELD_IN_SETTINGS_ERROR.search(str(exc))
    if found is None:
        return ConfigError(f"invalid settings: {exc}")
    field = found.group(1)
    name = env_name(field)
    value = os.environ.get(name)
    where = f"{name} is {shown(field, value)}" if value is not None else name
    return ConfigError(f"{where}: not valid JSON; {_json_shape(field)}")


def _json_shape(field: str) -> str:
    if field == "fallbacks":
        return 'expected {"alias or provider/model": ["provider/model", ...]}'
    return "expected JSON"


def load_settings() -> Settings:
    """``Settings()``, with any mistake in it as a ``ConfigError``."""
    try:
        return Settings()
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    except SettingsError as exc:
        raise from_settings_error(exc) from None
