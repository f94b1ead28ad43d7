"""Environment variables that override configuration keys, for containers.

DICOMNODE_SCP__PORT=11113 sets scp.port: the prefix, then the key path in capitals with a double
underscore between levels. Values are typed by the schema (text keys take the text as it is,
the others are read as YAML), and every error names the variable, so that a typo in a
container's environment is found at start-up rather than silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr


class VariableError(ValueError):
    """A DICOMNODE_* variable names no key, or its value cannot be read; the message names it."""


#: The prefix of the variables that override keys (DICOMNODE_SCP__PORT=11113 sets scp.port).
ENVIRONMENT_PREFIX = "DICOMNODE_"
#: Variables with that prefix that are not configuration keys.
_NOT_KEYS = frozenset({"DICOMNODE_CONFIG", "DICOMNODE_TRAIN_ARGS"})


def environment_overrides(
    environ: Mapping[str, str], schema: type[BaseModel]
) -> dict[str, tuple[tuple[str | int, ...], Any]]:
    """The keys of `schema` that DICOMNODE_* variables set: {variable: (key path, value)}.

    Levels are separated by a double underscore (DICOMNODE_SCP__PORT, DICOMNODE_DESTINATIONS__0__HOST;
    a mapping's own keys keep their case, DICOMNODE_PROMPT_SET_VERSIONS__cxr). A value is typed
    by the schema: text for text keys, YAML (11113, true, [CR, DX]) for the others. Raises
    VariableError naming the variable when it names no key or its value is not YAML.
    """
    found = {}
    for name in sorted(environ):
        if not name.startswith(ENVIRONMENT_PREFIX) or name in _NOT_KEYS:
            continue
        kind: Any = schema
        keys: list[str | int] = []
        for part in name[len(ENVIRONMENT_PREFIX) :].split("__"):
            kind, key = _key_below(kind, part, name, keys)
            keys.append(key)
        raw = environ[name]
        if _textual(kind):
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise VariableError(f"environment variable {name}: not a YAML value: {exc}") from None
        found[name] = (tuple(keys), value)
    return found


def unwrap(annotation: Any) -> list[Any]:
    """The types an annotation allows, without Annotated, Optional and None."""
    if get_origin(annotation) is Annotated:
        return unwrap(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return [t for arg in get_args(annotation) for t in unwrap(arg)]
    return [] if annotation is type(None) else [annotation]


def _textual(annotation: Any) -> bool:
    def text(kind: Any) -> bool:
        if get_origin(kind) is Literal:
            return all(isinstance(v, str) for v in get_args(kind))
        return kind in (str, Path, SecretStr)

    return all(text(kind) for kind in unwrap(annotation))


def _key_below(schema: Any, part: str, name: str, above: list[str | int]) -> tuple[Any, str | int]:
    """The schema and key that `part` of variable `name` names below the keys `above`."""
    where = ".".join(map(str, above)) or "the configuration"
    for kind in unwrap(schema):
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            key = part.lower()
            if key not in kind.model_fields or key == "source":
                known = ", ".join(k for k in kind.model_fields if k != "source")
                raise VariableError(f"environment variable {name}: {where} has no key {key!r} ({known})")
            return kind.model_fields[key].annotation, key
        if get_origin(kind) is tuple:
            if not part.isdigit():
                raise VariableError(
                    f"environment variable {name}: {where} is a list: give an index, not {part!r}"
                )
            return get_args(kind)[0], int(part)
        if get_origin(kind) is dict:
            return get_args(kind)[1], part
    raise VariableError(f"environment variable {name}: {where} is a value, it has no key {part!r}")


def apply(content: dict[str, Any], keys: tuple[str | int, ...], value: Any, name: str) -> None:
    """Put `value` at `keys` in the parsed file, creating the sections it lacks (not list entries)."""
    node: Any = content
    for depth, key in enumerate(keys[:-1]):
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                count = len(node) if isinstance(node, list) else 0
                where = ".".join(map(str, keys[:depth]))
                has = f"entries 0 to {count - 1}" if count else "no entries"
                raise VariableError(f"environment variable {name}: {where} has {has}, not {key}")
            node = node[key]
        else:
            if not isinstance(node, dict):
                where = ".".join(map(str, keys[:depth]))
                raise VariableError(f"environment variable {name}: {where} in the file is not a section")
            if node.get(key) is None:  # absent, or an empty section (`scp:` with nothing under it)
                node[key] = {}
            node = node[key]
        if not isinstance(node, dict | list):
            where = ".".join(map(str, keys[: depth + 1]))
            raise VariableError(f"environment variable {name}: {where} in the file is not a section")
    last = keys[-1]
    if isinstance(last, int) and (not isinstance(node, list) or last >= len(node)):
        raise VariableError(f"environment variable {name}: no entry {last} to override")
    node[last] = value
