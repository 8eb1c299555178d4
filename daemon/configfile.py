"""Reading the config file: YAML that notices keys given twice, and pydantic's validation
errors put in plain words, one line per mistake, each naming its key as the user wrote it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails


class Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, plus what the error messages need.

    It notes each key given twice (safe_load keeps the last one silently, so a second `scene:`
    would replace the first), and the source text of each value YAML read as a number, bool or
    null, so that a label written `yes` is quoted back as written rather than as True.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.duplicates: list[tuple[int, str]] = []  # (line, key path) of each second key
        self.scalar_text: dict[str, str] = {}  # key path -> source text of a non-string value
        self._key_paths: dict[yaml.Node, str] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        path = self._key_paths.get(node, "")
        seen = set()
        for key_node, value_node in node.value:
            # `<<: *base` merges keys that this mapping may then override: not a duplicate.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            key_path = f"{path}.{key}" if path else str(key)
            if key in seen:
                self.duplicates.append((key_node.start_mark.line + 1, key_path))
            seen.add(key)
            if key_node.tag != _STR_TAG:  # a set named `yes:`; a value's text replaces it below
                self.scalar_text[key_path] = key_node.value
            self._note(value_node, key_path)
        return super().construct_mapping(node, deep)

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> list[Any]:
        path = self._key_paths.get(node, "")
        for index, item in enumerate(node.value):
            self._note(item, f"{path}.{index}")
        return super().construct_sequence(node, deep)

    def _note(self, node: yaml.Node, key_path: str) -> None:
        self._key_paths[node] = key_path
        if isinstance(node, yaml.ScalarNode) and node.tag != _STR_TAG:
            self.scalar_text[key_path] = node.value


_MERGE_TAG = "tag:yaml.org,2002:merge"
_STR_TAG = "tag:yaml.org,2002:str"

# pydantic's error types in plain words; {fields} come from the error's ctx. Types not here
# fall back to pydantic's message with its prefixes taken off (see _translate).
_MESSAGES = {
    "missing": "required key is missing",
    "extra_forbidden": "unknown key (check its spelling)",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "too_short": "must have at least {min_length} items",
    "too_long": "must have at most {max_length} items",
    "string_too_short": "must not be empty",
    "string_type": "must be text",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "literal_error": "must be {expected}",
    "enum": "must be {expected}",
    "tuple_type": "must be a list",
    "list_type": "must be a list",
    "dict_type": "must be a mapping (key: value)",
    "path_type": "must be a path",
}

# What a key holds, for a value of the wrong shape, where "a list" or "a mapping" would say too
# little. "*" stands for any label set's name or list index.
_EXPECTED = {
    "watch.paths": "a list of folders",
    "watch.extensions": "a list of file extensions",
    "watch.exclude": "a list of folder names",
    "label_sets": "a mapping of set names to label sets",
    "label_sets.*.templates": "a list of templates, or openai or simple",
    "label_sets.*.negative_templates": "a list of templates",
    "label_sets.*.labels": "a list of labels",
    "label_sets.*.labels.*": (
        "a label name or a mapping with name (and optional prompts, negative_prompts)"
    ),
    "label_sets.*.labels.*.prompts": "a list of prompts",
    "label_sets.*.labels.*.negative_prompts": "a list of prompts",
}
_SHAPE_ERRORS = {"tuple_type", "list_type", "dict_type", "model_type"}

_Key = tuple[int | str, ...]


def describe(
    raw: dict[str, Any],
    exc: ValidationError,
    scalar_text: dict[str, str],
    sections: Mapping[str, type[BaseModel]],
) -> list[str]:
    """One `KEY.PATH: message` line per mistake."""
    lines = []
    for keys, errors in _mistakes(raw, exc.errors()).items():
        where = ".".join(map(str, keys)) or "(top level)"
        line = f"{where}: {_message(keys, errors, scalar_text, sections)}"
        if line not in lines:
            lines.append(line)
    return lines


def _mistakes(raw: dict[str, Any], errors: list[ErrorDetails]) -> dict[_Key, list[ErrorDetails]]:
    """pydantic's errors grouped by the key the user wrote: one group per mistake.

    A value that fits no member of a union (`str | LabelSpec`, `int | "auto"`) gets an error
    from each member, at the same key: they are one mistake. When the value had the shape of
    one member (a mapping, for LabelSpec), only that member's errors are kept, as they say
    what is wrong inside it.
    """
    located = []
    for error in errors:
        # pydantic checks a list's length after its items and counts only the valid ones:
        # [1.5] would also be "too short", which the item's own error explains.
        if error["type"] == "too_short" and len(error["input"]) >= error["ctx"]["min_length"]:
            continue
        keys, union_at = _locate(raw, error["loc"], missing=error["type"] == "missing")
        located.append((keys, union_at, error))
    went_inside = {keys[:at] for keys, at, _ in located if at is not None and len(keys) > at}
    mistakes: dict[_Key, list[ErrorDetails]] = {}
    for keys, union_at, error in located:
        if union_at is not None and keys in went_inside:
            continue  # a union member that did not fit the value's shape
        mistakes.setdefault(keys, []).append(error)
    return mistakes


def _locate(raw: Any, loc: tuple[int | str, ...], missing: bool) -> tuple[_Key, int | None]:
    """The part of pydantic's error location that the user wrote, and how much led to a union.

    pydantic also puts in the union member it tried ("str", "LabelSpec"): following the raw
    YAML along the location keeps only real keys and list indexes.
    """
    keys: list[int | str] = []
    union_at = None
    node = raw
    for position, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict:
            part = next(key for key in node if key == part)  # pydantic writes a key True as 1
            node = node[part]
        elif in_list:
            node = node[part]
        elif not (missing and position == len(loc) - 1):
            if union_at is None:
                union_at = len(keys)
            continue  # a union member's name, not a key
        keys.append(part)
    return tuple(keys), union_at


def _message(
    keys: _Key,
    errors: list[ErrorDetails],
    scalar_text: dict[str, str],
    sections: Mapping[str, type[BaseModel]],
) -> str:
    """One mistake in words: a hint to quote, what the key holds, or each error translated."""
    value = errors[0]["input"]
    wanted_text = any(error["type"] == "string_type" for error in errors)
    # YAML reads yes, no, on, off, 1984 and null as other things than text: the fix is quotes.
    if wanted_text and (value is None or isinstance(value, bool | int | float)):
        written = scalar_text.get(".".join(map(str, keys)), str(value))
        if not written:
            return "must not be empty"  # `- ` with nothing after it: there is nothing to quote
        if value is None:
            read_as = "null (no value)"
        elif isinstance(value, bool):
            read_as = str(value).lower()
        else:
            read_as = "a number"
        return f'{written} is read as {read_as} by YAML; quote it ("{written}")'
    # Set names and list indexes are the user's own: _EXPECTED names them "*".
    pattern = ".".join(
        "*" if isinstance(key, int) or (i == 1 and keys[0] == "label_sets") else str(key)
        for i, key in enumerate(keys)
    )
    if pattern in _EXPECTED and (len(errors) > 1 or errors[0]["type"] in _SHAPE_ERRORS):
        return f"must be {_EXPECTED[pattern]}"
    # Several errors left are a union's members, each with what it would accept.
    messages = list(dict.fromkeys(_translate(error, sections) for error in errors))
    return " or ".join([messages[0], *(m.removeprefix("must be ") for m in messages[1:])])


def _translate(error: ErrorDetails, sections: Mapping[str, type[BaseModel]]) -> str:
    """One pydantic error in plain words."""
    ctx = {name: _plain(value) for name, value in error.get("ctx", {}).items()}
    if error["type"] == "too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if error["type"] == "model_type":
        return "must be " + _mapping_of(ctx.get("class_name", ""), sections)
    if error["type"] in _MESSAGES:
        return _MESSAGES[error["type"]].format(**ctx)
    # value_error is our own validators' message; anything else is pydantic's wording, which
    # reads well enough once its prefixes are gone.
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return message.replace("Input should be", "must be")


def _plain(value: Any) -> Any:
    """A ctx value as a user would write it: 1 not 1.0, single not 'single'."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return value.replace("'", "")
    return value


def _mapping_of(class_name: str, sections: Mapping[str, type[BaseModel]]) -> str:
    """What a section of the config holds, from its model: its keys, required ones first.
    (pydantic names the section it wanted only by its class name.)"""
    if class_name not in sections:
        return "a mapping (key: value)"
    fields = sections[class_name].model_fields
    required = [name for name, field in fields.items() if field.is_required()]
    optional = [name for name, field in fields.items() if not field.is_required()]
    if not required:
        return f"a mapping with any of {', '.join(optional)}"
    return f"a mapping with {', '.join(required)} (and optional {', '.join(optional)})"


def one_line(text: str) -> str:
    return " ".join(text.split())
