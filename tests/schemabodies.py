"""Hypothesis strategies for request bodies, drawn from an endpoint's own schema.

``valid(Model)`` walks ``Model.model_json_schema()`` (types, enums, ranges, lengths, required and
optional properties, nested models by ``$ref``) and draws bodies the schema accepts, with unknown
fields now and then (the APIs ignore them). ``invalid(Model)`` draws a valid body and breaks one
field at a path the schema knows: a wrong type, a value out of range, a huge string, or deep
nesting. Sizes stay small so a test of a hundred bodies takes seconds.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st
from pydantic import BaseModel

Json = dict[str, Any]

# small JSON values of any shape
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)


DEEP = "\x00deep\x00"  # stands for a list nested 3000 deep (past any JSON parser's limit); see dumps


def nested(depth: int) -> Any:
    """A list nested ``depth`` deep."""
    v: Any = []
    for _ in range(depth):
        v = [v]
    return v


def dumps(body: Any) -> bytes:
    """A body as JSON bytes, DEEP written out (Python's own json cannot write, nor repr show, it)."""
    return json.dumps(body).replace(json.dumps(DEEP), "[" * 3000 + "]" * 3000).encode()


def _resolve(node: Json, defs: Json) -> Json:
    while "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    return node


def _strategy(node: Json, defs: Json) -> st.SearchStrategy[Any]:
    node = _resolve(node, defs)
    if "anyOf" in node:
        return st.one_of([_strategy(a, defs) for a in node["anyOf"]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "const" in node:
        return st.just(node["const"])
    kind = node.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        lo = node.get("minimum", -2**40)
        hi = node.get("maximum", node.get("exclusiveMaximum", 2**40 + 1) - 1)
        return st.integers(lo, min(hi, lo + 2**40))
    if kind == "number":
        return st.floats(min_value=node.get("minimum", node.get("exclusiveMinimum")),
                         max_value=node.get("maximum", node.get("exclusiveMaximum")),
                         exclude_min="exclusiveMinimum" in node, exclude_max="exclusiveMaximum" in node,
                         allow_nan=False, allow_infinity=False)
    if kind == "string":
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True)
        return st.text(min_size=node.get("minLength", 0), max_size=min(node.get("maxLength", 30), 30))
    if kind == "array":
        items = _strategy(node.get("items", {}), defs) if node.get("items") else json_values
        return st.lists(items, min_size=node.get("minItems", 0), max_size=min(node.get("maxItems", 3), 3))
    if kind == "object":
        if "properties" in node:
            props = node["properties"]
            required = set(node.get("required", ()))
            return st.fixed_dictionaries(
                {k: _strategy(v, defs) for k, v in props.items() if k in required},
                optional={k: _strategy(v, defs) for k, v in props.items() if k not in required})
        if "patternProperties" in node:
            [(pattern, value)] = node["patternProperties"].items()
            return st.dictionaries(st.from_regex(pattern, fullmatch=True), _strategy(value, defs), max_size=3)
        extra = node.get("additionalProperties")
        keys = st.text(max_size=8)
        values = _strategy(extra, defs) if isinstance(extra, dict) and extra else json_values
        return st.dictionaries(keys, values, max_size=3)
    return json_values  # {}: any JSON


def valid(model: type[BaseModel]) -> st.SearchStrategy[Json]:
    """Bodies ``model`` accepts, some with a field no schema knows."""
    schema = model.model_json_schema()
    body = _strategy(schema, schema.get("$defs", {}))
    extra = st.dictionaries(st.sampled_from(["x_unknown", "frobnicate", "echo_me"]), json_values, max_size=2)
    return st.builds(lambda b, e: {**e, **b}, body, extra)


def _paths(node: Json, defs: Json, prefix: tuple[Any, ...] = (), depth: int = 0) -> list[tuple[tuple[Any, ...], Json]]:
    """Each (path, schema) a body has, through objects and the first item of arrays."""
    node = _resolve(node, defs)
    out = [(prefix, node)] if prefix else []
    if depth > 3:
        return out
    arms = [_resolve(a, defs) for a in node.get("anyOf", [node])]
    arrays = [a for a in arms if a.get("type") == "array"]
    for arm in arms:
        if arm.get("type") == "object":
            for k, v in arm.get("properties", {}).items():
                out += _paths(v, defs, (*prefix, k), depth + 1)
        elif arm.get("type") == "array" and arm.get("items") and len(arrays) == 1:
            # (into an array's items only where one arm is an array: a value wrong for one arm's
            # items may be right for another's)
            out += _paths(arm["items"], defs, (*prefix, 0), depth + 1)
    return out


def _accepts_any(node: Json, defs: Json) -> bool:
    """Whether a field takes any JSON at some depth a bad value could reach (``{}``, ``list[Any]``)."""
    for a in (_resolve(a, defs) for a in node.get("anyOf", [node])):
        if not a.get("type") and "enum" not in a and "const" not in a:
            return True
        if a.get("type") == "array" and not a.get("items"):
            return True
        if a.get("type") == "object" and "properties" not in a and "patternProperties" not in a \
                and not a.get("additionalProperties", {}):
            return True
    return False


def _bad_values(node: Json, defs: Json) -> st.SearchStrategy[Any]:
    """Values a field must refuse: another type, out of its range, too long, too deep."""
    if _accepts_any(node, defs):
        return st.just(DEEP)  # only past the parser's nesting limit is it wrong for sure
    arms = [_resolve(a, defs) for a in node.get("anyOf", [node])]
    kinds = {a.get("type") for a in arms}
    wrong: list[st.SearchStrategy[Any]] = []
    if not kinds & {"string"} and "enum" not in str(arms):
        wrong.append(st.text(min_size=1, max_size=10))
    if not kinds & {"integer", "number"}:
        wrong.append(st.integers(-5, 5))
    if "boolean" not in kinds:
        wrong.append(st.booleans())
    if "array" not in kinds:
        wrong.append(st.lists(st.integers(), min_size=1, max_size=2))
    if "object" not in kinds:
        wrong.append(st.just({"a": 1}))
    for a in arms:
        if "enum" in a:
            wrong.append(st.just("not-a-" + str(a["enum"][0])))
        for bound in ("minimum", "exclusiveMinimum"):
            if bound in a:
                wrong.append(st.just(a[bound] - (1 if a.get("type") == "integer" else 0.5)))
        for bound in ("maximum", "exclusiveMaximum"):
            if bound in a:
                wrong.append(st.just(a[bound] + (1 if a.get("type") == "integer" else 0.5)))
        if a.get("type") == "integer" and "number" not in kinds:
            wrong.append(st.just(1.5))
        if "maxLength" in a:
            wrong.append(st.just("x" * (a["maxLength"] + 1)))
        if "minLength" in a and a["minLength"] > 0:
            wrong.append(st.just(""))
    if "string" not in kinds:
        wrong.append(st.just("y" * 40_000))
    wrong += [st.just(DEEP), st.just(nested(150))]
    return st.one_of(wrong)


@st.composite
def _broken(draw: st.DrawFn, model: type[BaseModel]) -> tuple[Json, str]:
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    body = draw(valid(model))
    paths = [(p, n) for p, n in _paths(schema, defs) if _settable(body, p)]
    path, node = draw(st.sampled_from(paths))
    _set(body, path, draw(_bad_values(node, defs)))
    return body, ".".join(map(str, path))


@st.composite
def _huge(draw: st.DrawFn, model: type[BaseModel]) -> Json:
    schema = model.model_json_schema()
    defs = schema.get("$defs", {})
    body = draw(valid(model))
    paths = [p for p, n in _paths(schema, defs) if _settable(body, p)
             and any(_resolve(a, defs).get("type") == "string" and "maxLength" not in _resolve(a, defs)
                     and "pattern" not in _resolve(a, defs) and "enum" not in _resolve(a, defs)
                     for a in n.get("anyOf", [n]))]
    if paths:
        _set(body, draw(st.sampled_from(paths)), "z " * draw(st.integers(10_000, 25_000)))
    return body


def huge(model: type[BaseModel]) -> st.SearchStrategy[Json]:
    """Valid bodies with one free string field made huge (tens of kilobytes)."""
    return _huge(model)


def invalid(model: type[BaseModel]) -> st.SearchStrategy[tuple[Json, str]]:
    """(a body with one known field broken, the path of that field)."""
    return _broken(model)


def _settable(body: Any, path: tuple[Any, ...]) -> bool:
    for p in path[:-1]:
        if isinstance(p, int):
            if not isinstance(body, list) or len(body) <= p:
                return False
        elif not isinstance(body, dict) or p not in body:
            return False
        body = body[p]
    last = path[-1]
    return isinstance(body, dict) if isinstance(last, str) else isinstance(body, list) and len(body) > last


def _set(body: Any, path: tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        body = body[p]
    body[path[-1]] = value
