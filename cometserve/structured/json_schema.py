"""JSON Schema -> regex for structured outputs (vLLM `structured_outputs.json`, OpenAI `response_format`
json_schema / json_object), for the regex -> byte DFA compiler (structured/regex.py). Full matches of the
regex are the JSON texts valid under the schema, value first and last, with nothing, a space, or a line
break and up to MAX_WHITESPACE - 1 spaces of indentation between tokens; the dialect is a subset of Python `re` (no `.`, anchors, lookarounds,
backreferences or lazy quantifiers).

Supported: `true`/`{}` (any value, containers nested at most `any_depth` deep), `type` (a name or a list),
`enum`, `const`, `nullable`, `anyOf`, `oneOf` (as anyOf), one-subschema `allOf`, local `$ref` (recursion is
cut after `any_depth` nested expansions where an alternative, optional property or empty array allows);
strings (`minLength`, `maxLength`, `pattern`, `format` date / time / date-time / uuid / email / ipv4;
other formats are annotations, as JSON Schema 2019-09 on reads them: any string), exact integer ranges
(`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`), numbers between whole-number `minimum` /
`maximum` (pydantic's ge / le; written without an exponent there), objects (`properties`, `required`,
`additionalProperties`, `min/maxProperties`), arrays (`items`, `prefixItems`, `minItems`, `maxItems`).
Annotations are ignored; any other keyword or combination raises SchemaError.

Simplifications (narrowing what is accepted, but for `pattern` and repeated keys): members come in the
declared order, and no keys but the declared ones next to `properties`; free-form object keys may repeat;
`prefixItems` items are all required; integers are canonical with at most 19 digits, numbers have at most
19 fraction digits and a 3-digit exponent; `date` allows day 31 in every month; enum/const scalars are
written as `json.dumps(value, ensure_ascii=False)` writes them (`1.0` stays `1.0`, "é" is not "\\u00e9");
`pattern` is anchored (leading `^` / trailing `$` dropped) and embedded between the quotes as is, so it is
assumed to allow no character that JSON escapes (`"`, backslash, control characters).
"""

from __future__ import annotations

import functools
import json
import math
import re

MAX_WHITESPACE = 16  # the longest run of JSON whitespace allowed between tokens of the output
MAX_DIGITS = 19  # integer digits: unbounded integers stay about int64-sized
# between tokens: nothing, one space, or a line break and its indentation. Compact, spaced and
# indented JSON all fit; free runs of any whitespace would let a model pad its output forever
WS = f"(?:[ ]|\\n[ ]{{0,{MAX_WHITESPACE - 1}}})?"
SEP = f"{WS},{WS}"
_CHAR = r'(?:[^"\\\u0000-\u001f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'  # one character of a JSON string
STRING = f'"{_CHAR}*"'
INTEGER = rf"-?(?:0|[1-9][0-9]{{0,{MAX_DIGITS - 1}}})"
NUMBER = rf"{INTEGER}(?:\.[0-9]{{1,{MAX_DIGITS}}})?(?:[eE][+\-]?[0-9]{{1,3}})?"
_HOURS, _HEX = "(?:[01][0-9]|2[0-3])", "[0-9a-fA-F]"
_DATE = r"[0-9]{4}\-(?:0[1-9]|1[0-2])\-(?:0[1-9]|[12][0-9]|3[01])"
_TIME = rf"{_HOURS}:[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]{{1,9}})?(?:[Zz]|[+\-]{_HOURS}:[0-5][0-9])"
FORMATS = {"date": _DATE, "time": _TIME, "date-time": f"{_DATE}[Tt]{_TIME}",
           "email": r"[A-Za-z0-9._%+\-]{1,64}@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63}){0,4}\.[A-Za-z]{2,24}",
           "ipv4": r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
           "uuid": rf"{_HEX}{{8}}\-{_HEX}{{4}}\-{_HEX}{{4}}\-{_HEX}{{4}}\-{_HEX}{{12}}"}
TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
IGNORED = frozenset((  # annotations (discriminator: oneOf branches already pin their tags with const)
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly", "strict", "discriminator", "$defs", "definitions"))
_FAMILY = {  # type-specific keyword -> the type it constrains ("number" also covers "integer")
    **dict.fromkeys(("minLength", "maxLength", "pattern", "format"), "string"),
    **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"), "number"),
    **dict.fromkeys(("properties", "required", "additionalProperties", "minProperties", "maxProperties"),
                    "object"),
    **dict.fromkeys(("items", "prefixItems", "minItems", "maxItems"), "array")}
_COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf")
_KNOWN = IGNORED | set(_FAMILY) | set(_COMBINATORS) | {"type", "enum", "const", "nullable"}


class SchemaError(ValueError):
    """An unsupported or unsatisfiable schema; the message starts with its location ('#/properties/age')."""


class _Unsatisfiable(SchemaError):
    """No value fits here (false schema, empty range, recursion cut off): an enclosing alternation,
    optional property or possibly-empty container drops the branch; otherwise it reaches the caller."""


def escape_literal(text: str) -> str:
    """Escape exactly the regex metacharacters; everything else (non-ASCII included) stays literal."""
    return "".join("\\" + c if c in "\\.[](){}*+?|^$-" else c for c in text)


def json_object_regex(any_depth: int = 3) -> str:
    """OpenAI's json_object mode: any JSON object (values nest up to any_depth levels of containers)."""
    return _seq(r"\{", f"{STRING}{WS}:{WS}{_any(any_depth)}", r"\}", 0, None)


def schema_to_regex(schema: dict | bool, *, any_depth: int = 3) -> str:
    """A regex whose full matches are JSON texts valid under `schema` (the supported subset)."""
    return _Compiler(schema, any_depth).compile(schema, "")


def _quant(lo: int, hi: int | None) -> str:
    if hi is None:
        return {0: "*", 1: "+"}.get(lo, f"{{{lo},}}")
    if lo == hi:
        return "" if lo == 1 else f"{{{lo}}}"
    return "?" if (lo, hi) == (0, 1) else f"{{{lo},{hi}}}"


def _alt(alts) -> str:
    alts = list(dict.fromkeys(alts))
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def _seq(open_: str, item: str, close: str, lo: int, hi: int | None) -> str:
    """open, lo..hi comma-separated items, close (one whitespace run before `close`, not two)."""
    if hi == 0:
        return open_ + WS + close
    more = "" if hi == 1 else f"(?:{SEP}{item}){_quant(max(lo - 1, 0), None if hi is None else hi - 1)}"
    return open_ + WS + (f"{item}{more}{WS}" if lo > 0 else f"(?:{item}{more}{WS})?") + close


@functools.cache
def _any(depth: int) -> str:
    """Any JSON value with containers nested at most `depth` deep."""
    alts = [STRING, NUMBER, "true", "false", "null"]
    if depth > 0:
        inner = _any(depth - 1)
        alts += [_seq(r"\[", inner, r"\]", 0, None), _seq(r"\{", f"{STRING}{WS}:{WS}{inner}", r"\}", 0, None)]
    return _alt(alts)


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _literal(value) -> str:
    """Exactly this JSON value, with free whitespace between the tokens of arrays and objects."""
    if isinstance(value, dict):
        members = [f"{escape_literal(_dumps(k))}{WS}:{WS}{_literal(v)}" for k, v in value.items()]
        return _join(r"\{", members, r"\}")
    if isinstance(value, list):
        return _join(r"\[", [_literal(v) for v in value], r"\]")
    return escape_literal(_dumps(value))


def _join(open_: str, items: list[str], close: str) -> str:
    return open_ + WS + (SEP.join(items) + WS if items else "") + close


def _json_type(value) -> str:
    if value is None or isinstance(value, bool):
        return "null" if value is None else "boolean"
    if isinstance(value, (int, float)):  # 1.0 is an integer to JSON Schema
        return "integer" if isinstance(value, int) or value.is_integer() else "number"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _fail(at: str, problem: str, cls=SchemaError) -> SchemaError:
    return cls(f"#{at}: {problem}")


class _Compiler:
    """One schema's translation; `at` is the JSON pointer of the subschema being translated."""

    def __init__(self, root, any_depth: int):
        self.root, self.any_depth, self.active_refs = root, any_depth, []

    def compile(self, schema, at: str) -> str:
        if schema is True:
            return _any(self.any_depth)
        if schema is False:
            raise _fail(at, "schema false accepts no value", _Unsatisfiable)
        if not isinstance(schema, dict):
            raise _fail(at, f"a schema must be an object or a boolean, not {type(schema).__name__}")
        for key in schema:
            if key not in _KNOWN:
                raise _fail(at, f"keyword {key!r} is not supported")
        if schema.get("nullable") is True:
            return self._either([lambda: self._inner(schema, at), lambda: "null"])
        return self._inner(schema, at)

    def _either(self, thunks) -> str:
        """Alternation of the branches that can hold a value (unsatisfiable ones are dropped)."""
        alts, error = [], None
        for thunk in thunks:
            try:
                alts.append(thunk())
            except _Unsatisfiable as err:
                error = error or err
        if not alts:
            raise error
        return _alt(alts)

    def _inner(self, schema: dict, at: str) -> str:
        for kw in (kw for kw in _COMBINATORS if kw in schema):
            others = sorted(set(schema) - IGNORED - {kw, "nullable"})
            if others:  # siblings would be a conjunction, which a regex cannot express cheaply
                raise _fail(at, f"{kw!r} cannot be combined with {others[0]!r}")
            if kw == "$ref":
                return self._ref(schema["$ref"], at)
            subs = schema[kw]
            if not isinstance(subs, list) or not subs or (kw == "allOf" and len(subs) != 1):
                raise _fail(at, f"{kw!r} must be a non-empty list of schemas (allOf: exactly one)")
            branches = [(sub, f"{at}/{kw}/{i}") for i, sub in enumerate(subs)]
            return self._either([lambda s=s, p=p: self.compile(s, p) for s, p in branches])
        types = self._types(schema, at)
        if "enum" in schema or "const" in schema:
            return self._enum(schema, at, types)
        if types is None:
            return _any(self.any_depth)
        return self._either([lambda t=t: self._typed(schema, at, t) for t in types])

    def _types(self, schema: dict, at: str) -> list[str] | None:
        """The listed types, or those implied by the keywords present (None: any value)."""
        if "type" not in schema:  # e.g. bare `properties`: generate that type rather than anything
            return [t for t in TYPES if t in {_FAMILY[k] for k in schema if k in _FAMILY}] or None
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        for t in types:
            if t not in TYPES:
                raise _fail(at, f"unknown 'type' {t!r}; expected one of {', '.join(TYPES)}")
        covered = {"number" if t == "integer" else t for t in types}
        for key in schema:
            if key in _FAMILY and _FAMILY[key] not in covered:
                raise _fail(at, f"keyword {key!r} does not apply to type {schema['type']!r}")
        return list(dict.fromkeys(types))

    def _typed(self, schema: dict, at: str, t: str) -> str:
        simple = {"boolean": "(?:true|false)", "null": "null"}
        return simple[t] if t in simple else getattr(self, "_" + t)(schema, at)  # _string, _number, ...

    def _number(self, schema: dict, at: str) -> str:
        """Any JSON number; between whole-number `minimum` / `maximum` (pydantic's ge / le), decimals
        without an exponent: a whole part in range, with a fraction where one stays in range."""
        bounds = [k for k in schema if _FAMILY.get(k) == "number"]
        if not bounds:
            return NUMBER
        odd = [k for k in bounds if k not in ("minimum", "maximum") or isinstance(schema[k], bool)
               or not isinstance(schema[k], (int, float)) or not math.isfinite(schema[k])
               or not float(schema[k]).is_integer()]
        if odd:
            raise _fail(at, f"{odd[0]!r} is not supported for type 'number' (whole-number 'minimum' and "
                        "'maximum' are; exclusive bounds, fractional bounds and 'multipleOf' are not)")
        cap = 10**MAX_DIGITS - 1
        lo, hi = int(schema.get("minimum", -cap)), int(schema.get("maximum", cap))
        if lo > hi:
            raise _fail(at, "'minimum' exceeds 'maximum'", _Unsatisfiable)
        frac = f"\\.[0-9]{{1,{MAX_DIGITS}}}"
        alts = [int_range_regex(lo, hi) + f"(?:\\.0{{1,{MAX_DIGITS}}})?"]  # whole values
        if max(lo, 0) <= hi - 1:  # k.f with 0 <= k: in [k, k + 1), inside [lo, hi] for k in [lo, hi - 1]
            alts.append(int_range_regex(max(lo, 0), hi - 1) + frac)
        if max(0, -hi) <= -lo - 1:  # -m.f: in (-(m + 1), -m], inside for m in [-hi, -lo - 1]
            alts.append("-" + int_range_regex(max(0, -hi), -lo - 1) + frac)
        return _group("|".join(alts))

    def _ref(self, ref, at: str) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise _fail(at, f"'$ref' {ref!r} is not supported: only local references like '#/$defs/Name'")
        target = self.root
        for token in ref[2:].split("/") if ref != "#" else []:
            token = token.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or token not in target:
                raise _fail(at, f"'$ref' {ref!r} does not resolve within the schema")
            target = target[token]
        if self.active_refs.count(ref) >= self.any_depth:
            raise _fail(at, f"recursive '$ref' {ref!r} nests deeper than any_depth={self.any_depth} where "
                        "the schema requires it (no optional property, empty array or alternative stops it)",
                        _Unsatisfiable)
        self.active_refs.append(ref)
        try:
            return self.compile(target, ref[1:])
        finally:
            self.active_refs.pop()

    def _enum(self, schema: dict, at: str, types: list[str] | None) -> str:
        others = sorted(set(schema) - IGNORED - {"enum", "const", "type", "nullable"})
        if others:
            raise _fail(at, f"'enum'/'const' cannot be combined with {others[0]!r}")
        values = schema.get("enum", [schema.get("const")])
        if not isinstance(values, list):
            raise _fail(at, "'enum' must be a list")
        if "enum" in schema and "const" in schema:
            values = [v for v in values if _dumps(v) == _dumps(schema["const"])]
        if types is not None:  # values of other types cannot be written
            allowed = set(types) | ({"integer"} if "number" in types else set())
            values = [v for v in values if _json_type(v) in allowed]
        if not values:
            raise _fail(at, "no 'enum'/'const' value has an allowed type", _Unsatisfiable)
        try:
            return _alt(_literal(v) for v in values)
        except ValueError as err:  # NaN / infinity are not JSON
            raise _fail(at, f"'enum'/'const' value is not JSON: {err}") from None

    def _count(self, schema: dict, at: str, low: str, high: str) -> tuple[int, int | None]:
        """The (min, max) of a minLength/maxLength-like pair (max None: unbounded)."""
        for key in (low, high):
            value = schema.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _fail(at, f"{key!r} must be a non-negative integer")
        lo, hi = schema.get(low, 0), schema.get(high)
        if hi is not None and lo > hi:
            raise _fail(at, f"{low!r} exceeds {high!r}", _Unsatisfiable)
        return lo, hi

    def _string(self, schema: dict, at: str) -> str:
        lo, hi = self._count(schema, at, "minLength", "maxLength")
        given = [k for k in ("format", "pattern", "minLength", "maxLength") if k in schema]
        if not given or given[0] not in ("format", "pattern"):
            return f'"{_CHAR}{_quant(lo, hi)}"'
        if len(given) > 1:  # intersecting two shapes, or a shape and a length, is not done
            raise _fail(at, f"{given[0]!r} cannot be combined with {given[1]!r}")
        value = schema[given[0]]
        if given[0] == "format":
            if not isinstance(value, str):
                raise _fail(at, "'format' must be a string")
            if value not in FORMATS:  # an annotation by default (JSON Schema 2019-09 on): any string
                return f'"{_CHAR}*"'
            return f'"{FORMATS[value]}"'
        pattern = value.removeprefix("^") if isinstance(value, str) else None
        if pattern is not None and pattern.endswith("$") and not pattern.endswith("\\$"):
            pattern = pattern[:-1]
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise _fail(at, f"'pattern' is not a valid regex: {err}") from None
        return f'"(?:{pattern})"'

    def _integer(self, schema: dict, at: str) -> str:
        if "multipleOf" in schema:
            raise _fail(at, "'multipleOf' is not supported")
        cap = 10**MAX_DIGITS - 1
        lo, hi = -cap, cap
        for key in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            value = schema.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _fail(at, f"{key!r} must be a finite number (the draft-4 boolean form is unsupported)")
            exclusive = key.startswith("exclusive")
            if key in schema and key.endswith("inimum"):  # an exclusive bound moves one integer further
                lo = max(lo, math.floor(value) + 1 if exclusive else math.ceil(value))
            elif key in schema:
                hi = min(hi, math.ceil(value) - 1 if exclusive else math.floor(value))
        if lo > hi:
            raise _fail(at, f"no integer of at most {MAX_DIGITS} digits is within the bounds", _Unsatisfiable)
        return int_range_regex(lo, hi) if (lo, hi) != (-cap, cap) else INTEGER

    def _object(self, schema: dict, at: str) -> str:
        props, required = schema.get("properties") or {}, schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(props, dict) or not isinstance(required, list):
            raise _fail(at, "'properties' must be an object and 'required' a list")
        if props or required:
            for key in ("minProperties", "maxProperties", "additionalProperties"):
                if key in schema and schema[key] is not False:
                    raise _fail(at, f"{key!r} is not supported together with 'properties' (except "
                                "additionalProperties: false)")
            for name in required:
                if name not in props:
                    raise _fail(at, f"'required' property {name!r} is not in 'properties' (only those "
                                "can be written)")
            return self._members(props, set(required), at)
        lo, hi = self._count(schema, at, "minProperties", "maxProperties")
        value = ""
        try:
            if extra is False:
                raise _fail(at, "additionalProperties: false", _Unsatisfiable)
            value = self.compile(extra, f"{at}/additionalProperties")
        except _Unsatisfiable:
            if lo > 0:
                raise _fail(at, "'minProperties' cannot be met: no property can be written", _Unsatisfiable)
            hi = 0
        return _seq(r"\{", f"{STRING}{WS}:{WS}{value}", r"\}", lo, hi)

    def _members(self, props: dict, required: set, at: str) -> str:
        """Declared properties in order; optional ones may be absent, with the commas still right."""
        members = []  # (regex of `"name": value`, required)
        for name, sub in props.items():
            try:
                value = self.compile(sub, f"{at}/properties/" + name.replace("~", "~0").replace("/", "~1"))
            except _Unsatisfiable:
                if name in required:
                    raise
                continue  # an optional property that can hold no value is never written
            members.append((f"{escape_literal(_dumps(name))}{WS}:{WS}{value}", name in required))

        def tail(start: int) -> str:  # the members after a present one: each preceded by its comma
            return "".join(SEP + m if req else f"(?:{SEP}{m})?" for m, req in members[start:])

        first = next((i for i, (_, req) in enumerate(members) if req), None)
        if first is not None:  # optional members before the first required one carry their comma after
            head = "".join(f"(?:{m}{SEP})?" for m, _ in members[:first])
            return rf"\{{{WS}{head}{members[first][0]}{tail(first + 1)}{WS}\}}"
        if not members:
            return rf"\{{{WS}\}}"
        # all optional: branch on the first present member (quadratic in the member count, not exponential)
        body = "|".join(m + tail(i + 1) for i, (m, _) in enumerate(members))
        return rf"\{{{WS}(?:(?:{body}){WS})?\}}"

    def _array(self, schema: dict, at: str) -> str:
        lo, hi = self._count(schema, at, "minItems", "maxItems")
        prefix, items = schema.get("prefixItems") or [], schema.get("items")
        if isinstance(items, list):  # the draft 4-7 tuple form
            prefix, items = items, None
        if not isinstance(prefix, list):
            raise _fail(at, "'prefixItems' must be a list of schemas")
        item, items = "", False if items is None and prefix else items  # prefixItems alone: exactly those
        if items is not False:
            try:
                item = _any(self.any_depth) if items in (None, True) else self.compile(items, f"{at}/items")
            except _Unsatisfiable:
                items = False
        more_lo, more_hi = max(lo - len(prefix), 0), None if hi is None else hi - len(prefix)
        if items is False:
            more_hi = 0 if more_hi is None else min(more_hi, 0)
        if more_hi is not None and more_lo > more_hi:
            raise _fail(at, "no array length satisfies minItems/maxItems with these items", _Unsatisfiable)
        if not prefix:
            return _seq(r"\[", item, r"\]", more_lo, more_hi)
        parts = [self.compile(s, f"{at}/prefixItems/{i}") for i, s in enumerate(prefix)]
        rest = f"(?:{SEP}{item}){_quant(more_lo, more_hi)}" if more_hi != 0 else ""
        return rf"\[{WS}{SEP.join(parts)}{rest}{WS}\]"


def int_range_regex(lo: int, hi: int) -> str:
    """Canonical decimal integers in [lo, hi] (lo <= hi), without '-0'."""
    alts = []
    if lo < 0:  # negatives: '-' then the magnitudes in [max(1, -hi), -lo]
        alts.append("-" + _group(_nonneg_range(max(1, -hi), -lo)))
    if hi >= 0:
        alts.append(_nonneg_range(max(0, lo), hi))
    return _group("|".join(alts))


def _group(regex: str) -> str:
    return f"(?:{regex})" if "|" in regex else regex


def _nonneg_range(a: int, b: int) -> str:
    """[a, b] split by digit count; runs of lengths covered completely merge into `[1-9][0-9]{m,n}`."""
    def full(n: int) -> bool:  # every n-digit number is in range
        return (a == 1 if n == 1 else a <= 10 ** (n - 1)) and b >= 10**n - 1

    alts, n, top = [], len(str(a)), len(str(b))
    while n <= top:
        if full(n):
            m = n
            while m < top and full(m + 1):
                m += 1
            alts.append("[1-9]" + ("[0-9]" + _quant(n - 1, m - 1) if m > 1 else ""))
            n = m + 1
        else:
            low = max(a, 10 ** (n - 1) if n > 1 else 0)
            alts.append(_same_length(str(low), str(min(b, 10**n - 1))))
            n += 1
    return "|".join(alts)


def _same_length(a: str, b: str) -> str:
    """Digit strings in [a, b] of one length: split on the first digit (partial low, full middle, partial
    high), recursing on the rest."""
    if a == b:
        return a
    if len(a) == 1:
        return f"[{a}-{b}]"
    if a[0] == b[0]:
        return a[0] + _group(_same_length(a[1:], b[1:]))
    rest, first, last, alts, high = len(a) - 1, int(a[0]), int(b[0]), [], []
    if a[1:] != "0" * rest:
        alts.append(a[0] + _group(_same_length(a[1:], "9" * rest)))
        first += 1
    if b[1:] != "9" * rest:
        high.append(b[0] + _group(_same_length("0" * rest, b[1:])))
        last -= 1
    if first <= last:
        alts.append((str(first) if first == last else f"[{first}-{last}]") + "[0-9]" + _quant(rest, rest))
    return "|".join(alts + high)
