"""The shipped JSON Schemas as checks: a compiled check for speed, jsonschema for the reason.

Status files are read through their schemas in ``schemas/`` (the schemas
are the one definition of their shape). Two things check a value against a
schema, both built once per process and cached:

* :func:`compiled` turns a schema (or a part of it, such as
  ``status-relay-job``'s ``#/$defs/row``) into one Python predicate. It
  implements the keywords the status schemas use (``type``, ``enum``,
  ``const``, ``pattern``, bounds, ``required``, ``properties``,
  ``additionalProperties``, ``propertyNames``, ``items``, ``anyOf``, local
  ``$ref``) with JSON Schema's semantics, and refuses to compile a schema holding any
  other keyword, so a schema never passes a value because a keyword was
  skipped. A relay job file of 50,000 rows is checked in a fraction of a
  second; a generic validator takes several.
* :func:`validator` is the jsonschema validator of a schema, with the same
  ECMA-262 pattern anchors the spec loader uses (``$`` is the end of the
  text). It is consulted only for a value the compiled check refused, to
  say which field is wrong and why; ``tests/test_schema_check.py`` holds
  the two to the same verdicts.

:func:`problem` is the one entry point: None for a valid value, else the
first error as ``rows[3].attempts: -1 is less than the minimum of 0``.

Pure: the schemas are files shipped with the package, read once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sized
from functools import cache
from typing import Any

import jsonschema
from jsonschema.exceptions import best_match

from reconciler.resources import schemas_dir

# The spec loader's reading of a schema pattern (ECMA-262 anchors) and its validator class: one
# meaning for every shipped schema.
from reconciler.specs import _ecma_regex, _SchemaValidator

Check = Callable[[Any], bool]

_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "$comment", "title", "description", "default", "examples"})
_MESSAGE_LIMIT = 300


@cache
def schema(name: str) -> dict[str, Any]:
    """``schemas/<name>.schema.json``, parsed."""
    with open(schemas_dir() / f"{name}.schema.json", encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


@cache
def validator(name: str, pointer: str = "") -> jsonschema.protocols.Validator:
    """The jsonschema validator of ``schemas/<name>.schema.json`` (of its part at ``pointer``, e.g. ``/$defs/row``)."""
    whole: jsonschema.protocols.Validator = _SchemaValidator(schema(name))
    return whole if not pointer else whole.evolve(schema={"$ref": f"#{pointer}"})


@cache
def compiled(name: str, pointer: str = "") -> Check:
    """The compiled check of ``schemas/<name>.schema.json`` (of its part at ``pointer``)."""
    compiler = _Compiler(schema(name))
    return compiler.ref(f"#{pointer}")


def problem(name: str, value: Any, pointer: str = "", where: str = "") -> str | None:
    """Why ``value`` does not follow the schema (its part at ``pointer``), or None.

    The reason names the field below ``where`` (``rows[3]`` for a row
    checked on its own), e.g. ``rows[3].attempts: -1 is less than the
    minimum of 0``.
    """
    if compiled(name, pointer)(value):
        return None
    error = best_match(validator(name, pointer).iter_errors(value))
    if error is None:  # the two disagree: say so rather than pass the value
        return f"{where or 'document'}: does not match schemas/{name}.schema.json"
    field = field_name(error.absolute_path, where)
    message = error.message if len(error.message) <= _MESSAGE_LIMIT else error.message[: _MESSAGE_LIMIT - 1] + "…"
    return f"{field}: {message}" if field else message


def field_name(path: Iterable[Any], where: str = "") -> str:
    """A JSON path as a field name: ``jobs.install-7zip.counts.Failed``, ``rows[3].client``."""
    out = where
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def with_defaults(name: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` with each absent top-level field that declares a ``default`` in the schema set to it.

    A reader's tolerance of files written before a field existed, declared
    in the schema next to the field.
    """
    properties: Mapping[str, Any] = schema(name).get("properties", {})
    filled = dict(doc)
    for key, sub in properties.items():
        if key not in filled and isinstance(sub, dict) and "default" in sub:
            filled[key] = sub["default"]
    return filled


# ------------------------------------------------------------------ the compiler


def _always(value: Any) -> bool:
    return True


def _never(value: Any) -> bool:
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_TYPES: dict[str, Check] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "number": _is_number,
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
}


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: ``1 == 1.0``, ``true != 1``, arrays and objects element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def _all(checks: list[Check]) -> Check:
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda v: first(v) and second(v)
    frozen = tuple(checks)
    return lambda v: all(check(v) for check in frozen)


class _Compiler:
    """Compiles the schemas' keyword subset into predicates; local ``$ref`` s are compiled once each."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.refs: dict[str, Check] = {}

    def ref(self, ref: str) -> Check:
        if not ref.startswith("#"):
            raise ValueError(f"$ref {ref!r} is not supported by the compiled check (only local ones are)")
        if ref not in self.refs:
            slot: list[Check] = []
            self.refs[ref] = lambda v: slot[0](v)  # a recursive schema meets this while compiling
            node: Any = self.root
            for part in ref[1:].split("/")[1:]:
                node = node[part.replace("~1", "/").replace("~0", "~")]
            slot.append(self.compile(node))
            self.refs[ref] = slot[0]
        return self.refs[ref]

    def compile(self, node: Any) -> Check:
        if node is True:
            return _always
        if node is False:
            return _never
        if not isinstance(node, dict):
            raise TypeError(f"a schema must be an object or a boolean, got {node!r}")
        checks: list[Check] = []
        handled = set(_ANNOTATIONS)
        for keyword, build in _KEYWORDS:
            if any(k in node for k in keyword):
                handled.update(keyword)
                checks.append(build(self, node))
        unknown = sorted(set(node) - handled)
        if unknown:
            raise ValueError(f"keyword {unknown[0]!r} is not supported by the compiled check")
        return _all(checks)


def _type(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
    names = [node["type"]] if isinstance(node["type"], str) else list(node["type"])
    checks = tuple(_TYPES[name] for name in names)
    if len(checks) == 1:
        return checks[0]
    return lambda v: any(check(v) for check in checks)


def _enum(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
    values = list(node["enum"])
    if all(isinstance(value, str) for value in values):
        allowed = frozenset(values)
        return lambda v: isinstance(v, str) and v in allowed
    return lambda v: any(_equal(v, value) for value in values)


def _const(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
    const = node["const"]
    return lambda v: _equal(v, const)


def _pattern(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
    regex = _ecma_regex(node["pattern"])
    return lambda v: not isinstance(v, str) or regex.search(v) is not None


def _bounds(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
    low, high = node.get("minimum"), node.get("maximum")
    low_x, high_x = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")

    def check(v: Any) -> bool:
        if not _is_number(v):
            return True
        return ((low is None or v >= low) and (high is None or v <= high)
                and (low_x is None or v > low_x) and (high_x is None or v < high_x))
    return check


def _sizes(kind: type[Sized], low_key: str, high_key: str) -> Callable[[_Compiler, Mapping[str, Any]], Check]:
    def build(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
        low, high = node.get(low_key, 0), node.get(high_key)
        return lambda v: not isinstance(v, kind) or (low <= len(v) and (high is None or len(v) <= high))
    return build


def _required(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
    required = tuple(node["required"])
    return lambda v: not isinstance(v, dict) or all(key in v for key in required)


def _object(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
    properties = {key: compiler.compile(sub) for key, sub in node.get("properties", {}).items()}
    extra = compiler.compile(node.get("additionalProperties", True))
    key_check = compiler.compile(node["propertyNames"]) if "propertyNames" in node else None
    get = properties.get

    def check(v: Any) -> bool:
        if not isinstance(v, dict):
            return True
        for key, item in v.items():
            if not isinstance(key, str):  # a YAML reader makes 1: or null: keys; JSON has none
                return False
            value_check = get(key, extra)
            if not value_check(item) or (key_check is not None and not key_check(key)):
                return False
        return True
    return check


def _items(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
    item_check = compiler.compile(node["items"])
    return lambda v: not isinstance(v, list) or all(item_check(item) for item in v)


def _any_of(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
    checks = tuple(compiler.compile(sub) for sub in node["anyOf"])
    return lambda v: any(check(v) for check in checks)


def _ref(compiler: _Compiler, node: Mapping[str, Any]) -> Check:
    return compiler.ref(node["$ref"])


_KEYWORDS: tuple[tuple[tuple[str, ...], Callable[[_Compiler, Mapping[str, Any]], Check]], ...] = (
    (("type",), _type),
    (("enum",), _enum),
    (("const",), _const),
    (("pattern",), _pattern),
    (("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"), _bounds),
    (("minLength", "maxLength"), _sizes(str, "minLength", "maxLength")),
    (("minItems", "maxItems"), _sizes(list, "minItems", "maxItems")),
    (("minProperties", "maxProperties"), _sizes(dict, "minProperties", "maxProperties")),
    (("required",), _required),
    (("properties", "additionalProperties", "propertyNames"), _object),
    (("items",), _items),
    (("anyOf",), _any_of),
    (("$ref",), _ref),
)
