"""Reading a study YAML into the typed config (config.py): duplicate keys refused, YAML errors and
bad keys reported in one line naming the file and the key, `--set key.path=value` overrides applied
before validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from hpo_peft.core.config import StudyConfig, describe_validation_errors
from hpo_peft.core.errors import UserError


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, but a key written twice in one mapping is an error: plain yaml keeps
    the last one and silently drops the first (a whole section, for a top-level key)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first at line {first.line + 1}); keep one",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=UniqueKeyLoader)


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """One line: `line L, column C: problem (context at line ...)`, from yaml's marks."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return " ".join(str(error).split())
    mark = error.problem_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    if error.context:
        context = error.context
        where = error.context_mark
        if where is not None and (where.line, where.column) != (mark.line, mark.column):
            context += f" that starts at line {where.line + 1}, column {where.column + 1}"
        text += f" ({context})"
    return text


def _parse_scalar(text: str, item: str) -> Any:
    try:
        return parse_yaml(text)
    except yaml.YAMLError as err:
        problem = describe_yaml_error(err).replace("line 1, ", "", 1)
        raise UserError(f"override {item!r}: the value is not valid YAML ({problem}); quote it or fix it") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (value parsed as YAML) to a raw config dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key.path=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value, item)
    return raw


def _format_error(path: Path, error: ValidationError) -> str:
    return f"{path}: invalid config: " + "; ".join(describe_validation_errors(error))


def load_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read and validate a study YAML. Relative data/model/kit paths are taken from the working
    directory, like every other path the user types."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the config ({err.strerror or err})") from None
    try:
        raw = parse_yaml(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {describe_yaml_error(err)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys")
    raw = apply_overrides(raw, overrides or [])
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_error(path, err)) from None
