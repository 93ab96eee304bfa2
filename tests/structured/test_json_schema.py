"""JSON Schema -> regex translation, with Python's `re.fullmatch` as the oracle: valid texts (hand-written
and generated from the schema, compact and indented) match, invalid ones do not, unsupported schemas are
refused with the keyword and location, and the regexes stay within the DFA compiler's dialect."""

import itertools
import json
import random
import re

import pytest

from cometserve.structured.json_schema import (
    MAX_WHITESPACE,
    SchemaError,
    escape_literal,
    json_object_regex,
    schema_to_regex,
)

PERSON = {  # what pydantic emits for a model with a nested model, an Enum, Optional fields and a tuple
    "$defs": {
        "Address": {
            "title": "Address",
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 20, "title": "Street"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            },
            "required": ["street", "zip"],
        },
        "Role": {"enum": ["admin", "user", "guest"], "title": "Role", "type": "string"},
    },
    "title": "Person",
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"$ref": "#/$defs/Role"},
        "email": {"anyOf": [{"type": "string", "format": "uuid"}, {"type": "null"}], "default": None},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 4},
        "address": {"$ref": "#/$defs/Address"},
        "score": {"type": ["number", "null"]},
        "birthday": {"type": "string", "format": "date"},
        "point": {"type": "array", "prefixItems": [{"type": "number"}, {"type": "integer"}],
                  "minItems": 2, "maxItems": 2},
        "active": {"type": "boolean", "default": True},
        "extra": {"type": "object", "additionalProperties": {"type": "integer", "minimum": -5, "maximum": 5}},
        "anything": {},
    },
    "required": ["name", "age", "role", "address"],
}
PERSON_OK = {
    "name": 'Ada "Q" \\é', "age": 36, "role": "admin", "email": "123e4567-e89b-12d3-a456-426614174000",
    "tags": ["x", "y/z", "\n\t"], "address": {"street": "Main St 1", "zip": "12345", "country": None},
    "score": -1.5e-3, "birthday": "1990-02-28", "point": [0.5, -3], "active": False, "extra": {"a": -5},
    "anything": [1, {"k": [None, "v"]}],
}
SCHEMAS = {
    "person": PERSON,
    "any": {},
    "scalars": {"type": ["string", "integer", "boolean", "null"]},
    "numbers": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
    "enum": {"enum": ["a-b", 1, 2.5, None, True, [1, "x"], {"k": {"n": [".*"]}}, "日本 \"q\""]},
    "const": {"const": {"a": [1, 2], "b": "c"}},
    "times": {"type": "array",
              "items": {"anyOf": [{"type": "string", "format": f} for f in ("time", "date-time")]}},
    "tuple_rest": {"type": "array", "prefixItems": [{"const": "head"}], "items": {"type": "integer"}},
    "free_object": {"type": "object", "minProperties": 1, "maxProperties": 2},
    "all_optional": {"type": "object", "additionalProperties": False,
                     "properties": {k: {"type": "integer"} for k in "abcd"}},
    "nullable": {"type": "string", "nullable": True, "maxLength": 2},
    "tree": {"$ref": "#/$defs/Node", "$defs": {"Node": {"type": "object", "required": ["v"], "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}}},
}


def compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def forms(value) -> list[str]:
    """The value compact, with spaces after separators, and indented (when the runs fit MAX_WHITESPACE)."""
    out = [compact(value), json.dumps(value, ensure_ascii=False)]
    indented = json.dumps(value, ensure_ascii=False, indent=2)
    if all(len(run) <= MAX_WHITESPACE for run in re.findall(r"\n *", indented)):
        out.append(indented)
    return out


def accepts(regex: str, value) -> bool:
    return all(re.fullmatch(regex, text) for text in forms(value))


# --- a small generator of valid values, for the subset the schemas above use ---

CHARS = list("abz09 -_./\\\"'é中😀") + ["\n", "\t", "\x01"]


def _resolve(root, ref):
    node = root
    for token in ref[2:].split("/"):
        node = node[token]
    return node


def generate(schema, rng: random.Random, root, depth: int = 3):
    if schema is True or schema == {} or (isinstance(schema, dict) and set(schema) <= {"title", "default"}):
        kinds = ["integer", "string", "null", "array", "object"][: 5 if depth > 0 else 3]
        return generate({"type": rng.choice(kinds)}, rng, root, depth)  # the container spends the depth
    if "$ref" in schema:
        return generate(_resolve(root, schema["$ref"]), rng, root, depth - 1)
    if "anyOf" in schema:
        return generate(rng.choice(schema["anyOf"]), rng, root, depth)
    if "enum" in schema or "const" in schema:
        return rng.choice(schema.get("enum", [schema.get("const")]))
    kind = schema["type"] if isinstance(schema["type"], str) else rng.choice(schema["type"])
    if schema.get("nullable") and rng.random() < 0.3:
        return None
    if kind == "string":
        fmt = schema.get("format") or schema.get("pattern")
        if fmt == "^[0-9]{5}$":
            return "".join(rng.choice("0123456789") for _ in range(5))
        if fmt:
            return {"date": "2024-12-31", "uuid": "00000000-0000-4000-8000-00000000abcd",
                    "time": "23:59:60.123+05:30", "date-time": "2024-01-01T00:00:00Z"}[fmt]
        n = rng.randint(schema.get("minLength", 0), schema.get("maxLength", 8))
        return "".join(rng.choice(CHARS) for _ in range(n))
    if kind == "integer":
        return rng.randint(schema.get("minimum", -10**6), schema.get("maximum", 10**6))
    if kind == "number":
        return rng.choice([0, -7, 3.25, 1e-7, -2.5e20, rng.uniform(-1e3, 1e3)])
    if kind in ("boolean", "null"):
        return rng.choice([True, False]) if kind == "boolean" else None
    if kind == "array":
        prefix = [generate(s, rng, root, depth - 1) for s in schema.get("prefixItems", [])]
        if "prefixItems" in schema and "items" not in schema:
            return prefix
        n = rng.randint(schema.get("minItems", 0), schema.get("maxItems", 3) if depth > 0 else 0)
        return prefix + [generate(schema.get("items", {}), rng, root, depth - 1) for _ in range(n)]
    props, required = schema.get("properties", {}), schema.get("required", [])
    if not props:
        n = rng.randint(schema.get("minProperties", 0), schema.get("maxProperties", 3) if depth > 0 else 1)
        values = schema.get("additionalProperties", {})
        return {f"k{i}": generate(values, rng, root, depth - 1) for i in range(n)}
    return {k: generate(s, rng, root, depth - 1) for k, s in props.items()
            if k in required or (depth > 0 and rng.random() < 0.5)}


# --- the dialect the DFA compiler reads ---

def assert_in_dialect(regex: str):
    """No '.', anchors, lookarounds, backreferences, flags, lazy or possessive quantifiers; escapes from the
    agreed list; classes closed."""
    i, n = 0, len(regex)
    while i < n:
        c = regex[i]
        if c == "\\":
            assert regex[i + 1] in '\\.[](){}*+?|^$-/"ntrfdwsu', regex[i:i + 2]
            if regex[i + 1] == "u":
                assert re.fullmatch(r"[0-9a-fA-F]{4}", regex[i + 2:i + 6])
            i += 2
            continue
        assert c not in ".^$", (c, regex[max(0, i - 20):i + 20])
        if c == "[":
            i += 1
            while regex[i] != "]":
                i += 2 if regex[i] == "\\" else 1
        elif c == "(":
            assert regex[i + 1] != "?" or regex[i + 2] == ":", regex[i:i + 3]
        elif c in "*+?}":
            assert i + 1 == n or regex[i + 1] not in "?+", regex[i:i + 2]
        i += 1
    re.compile(regex)


@pytest.mark.parametrize("name", SCHEMAS)
def test_generated_values_match_and_regex_is_in_dialect(name):
    regex = schema_to_regex(SCHEMAS[name])
    assert_in_dialect(regex)
    rng = random.Random(name)
    for _ in range(60):
        value = generate(SCHEMAS[name], rng, SCHEMAS[name])
        for text in forms(value):
            assert re.fullmatch(regex, text), (name, text)


DROP = object()  # person(field=DROP): leave the field out


def person(**fields):
    """A Person value with its members in the declared order (the regex wants them so)."""
    base = {"name": "A", "age": 0, "role": "guest", "address": {"street": "", "zip": "00000"}}
    merged = {**base, **fields}
    return {k: merged[k] for k in PERSON["properties"] if k in merged and merged[k] is not DROP}


@pytest.mark.parametrize("name", SCHEMAS)
def test_mutated_texts_match_only_if_still_json(name):
    """Soundness without a schema validator: whatever the regex accepts parses as JSON, unpadded."""
    regex = re.compile(schema_to_regex(SCHEMAS[name]))
    rng = random.Random(name + "mutate")
    for _ in range(40):
        text = rng.choice(forms(generate(SCHEMAS[name], rng, SCHEMAS[name])))
        for _ in range(10):
            i = rng.randrange(len(text) + 1)
            cut = text[:i] + text[i + rng.randint(0, 2):]
            noise = "".join(rng.choice(' ,:"{}[]\\0e.-\n') for _ in range(rng.randint(0, 2)))
            mutated = cut[:i] + noise + cut[i:]
            if regex.fullmatch(mutated):
                json.loads(mutated)  # raises if the regex accepted a text that is not JSON
                assert mutated == mutated.strip(), repr(mutated)


def test_person_hand_written():
    regex = schema_to_regex(PERSON)
    assert accepts(regex, PERSON_OK)
    assert accepts(regex, person())
    assert accepts(regex, person(age=150, score=None, email=None, tags=[], extra={}, anything={"a": []}))
    # unicode escapes in free strings are fine too
    assert re.fullmatch(regex, json.dumps(person(name="é😀")))
    bad = [
        person(name=DROP), person(address=DROP),  # missing required
        {**person(), "nickname": "x"},  # extra property
        person(age="36"), person(age=1.5), person(active="yes"), person(score="1"),  # wrong types
        person(age=151), person(age=-1),  # out of range
        person(name=""), person(name="x" * 13),  # string length
        person(role="root"), person(tags=["a"] * 5), person(tags=["toolong"]),
        person(point=[1, 2, 3]), person(point=[1]), person(point=[1, 2.5]),
        person(birthday="2024-13-01"), person(email="not-a-uuid"),
        person(address={"street": "s", "zip": "1234"}), person(address={"zip": "12345"}),
        person(extra={"a": 6}), person(anything=[[[[[1]]]]]),
        {"age": 1, "name": "A", "role": "guest", "address": person()["address"]},
    ]  # the last one is valid JSON Schema-wise, but members must come in the declared order
    for value in bad:
        assert not any(re.fullmatch(regex, text) for text in forms(value)), value
    text = compact(person())
    for broken in [" " + text, text + " ", text + "\n", text[:-1] + ",}", text.replace(",", ",,", 1),
                   text.replace(":", ":" + " " * (MAX_WHITESPACE + 1), 1), text.replace('"A"', '"\\x"')]:
        assert not re.fullmatch(regex, broken), broken
    assert re.fullmatch(regex, text.replace(":", "\n" + " " * (MAX_WHITESPACE - 1) + ":", 1))
    assert not re.fullmatch(regex, text.replace(":", "  :", 1))  # two spaces: only indentation may
    assert not re.fullmatch(regex, text.replace(":", "\t:", 1))


def test_optional_properties_commas():
    schema = {"type": "object", "properties": {k: {"type": "integer"} for k in "abc"}, "required": ["b"]}
    regex = schema_to_regex(schema)
    for text in ['{"b":1}', '{"a":1,"b":2}', '{"b":1,"c":2}', '{"a":1,"b":2,"c":3}', '{ "a" : 1 ,\n"b":2 }']:
        assert re.fullmatch(regex, text), text
    for text in ["{}", '{,"b":1}', '{"b":1,}', '{"a":1}', '{"a":1,,"b":2}', '{"a":1"b":2}', '{"b":1,"b":1}']:
        assert not re.fullmatch(regex, text), text


@pytest.mark.parametrize("mask", range(32))
def test_every_subset_of_properties(mask):
    names = "pqrst"
    required = [k for i, k in enumerate(names) if mask >> i & 1]
    regex = schema_to_regex({"type": "object", "required": required,
                             "properties": {k: {"type": "boolean"} for k in names}})
    for r in range(6):
        for subset in itertools.combinations(names, r):
            text = compact({k: True for k in subset})
            assert bool(re.fullmatch(regex, text)) == (set(required) <= set(subset)), (required, text)


def test_regex_size_stays_polynomial():
    props = {f"field_{i}": {"type": ["integer", "string"]} for i in range(10)}
    mixed = {"type": "object", "properties": props, "required": [f"field_{i}" for i in range(0, 10, 2)]}
    assert len(schema_to_regex(mixed)) < 20_000
    assert len(schema_to_regex({"type": "object", "properties": props})) < 20_000
    assert len(schema_to_regex(PERSON)) < 100_000


INT_RANGES = [(0, 100), (-128, 127), (7, 7), (-5, 12), (-1000, -3), (0, 0), (-1, 0), (-99, 99), (1, 9),
              (10, 99), (19, 1091), (-12345, 67890)]


@pytest.mark.parametrize("lo,hi", INT_RANGES)
def test_integer_range_exhaustive(lo, hi):
    pattern = re.compile(schema_to_regex({"type": "integer", "minimum": lo, "maximum": hi}))
    for i in range(lo - 50, hi + 51):
        assert bool(pattern.fullmatch(str(i))) == (lo <= i <= hi), i
    for text in ["-0", "007", "+5", "1.0", "1e2", " 1", ""]:
        assert not pattern.fullmatch(text)


def test_integer_ranges_random():
    rng = random.Random(0)
    for _ in range(150):
        lo = rng.randint(-3000, 3000)
        hi = lo + rng.randint(0, 600)
        pattern = re.compile(schema_to_regex({"type": "integer", "minimum": lo, "maximum": hi}))
        assert all(bool(pattern.fullmatch(str(i))) == (lo <= i <= hi) for i in range(lo - 30, hi + 31))
    for _ in range(150):  # big magnitudes: the boundaries, around powers of ten, and random samples
        lo, hi = sorted(rng.choice([-1, 1]) * rng.randint(0, 10 ** rng.randint(1, 18)) for _ in range(2))
        pattern = re.compile(schema_to_regex({"type": "integer", "minimum": lo, "maximum": hi}))
        probes = [lo, hi, lo - 1, hi + 1]
        probes += [s * 10**k + d for s in (1, -1) for k in range(19) for d in (-1, 0)]
        probes += [rng.randint(lo - 10, hi + 10) for _ in range(50)]
        for i in probes:
            assert bool(pattern.fullmatch(str(i))) == (lo <= i <= hi), (lo, hi, i)


def test_integer_big_range_and_open_bounds():
    pattern = re.compile(schema_to_regex({"type": "integer", "minimum": 10, "maximum": 1_000_000}))
    for i in [10, 11, 99, 100, 999_999, 1_000_000] + list(range(10, 1_000_001, 9973)):
        assert pattern.fullmatch(str(i)), i
    for i in [9, 0, -10, 1_000_001, 2_000_000, 10_000_000]:
        assert not pattern.fullmatch(str(i)), i
    cap = 10**19 - 1
    cases = [({"minimum": 1}, 1, cap), ({"maximum": -3}, -cap, -3),
             ({"exclusiveMinimum": 0, "exclusiveMaximum": 10}, 1, 9),
             ({"minimum": 0.5, "maximum": 3.5}, 1, 3), ({"exclusiveMinimum": -2.5, "maximum": 1e3}, -2, 1000),
             ({"minimum": 0, "exclusiveMinimum": 4}, 5, cap)]
    for bounds, lo, hi in cases:
        pattern = re.compile(schema_to_regex({"type": "integer", **bounds}))
        powers = [s * 10**k for s in (1, -1) for k in range(20)]
        for i in [lo - 1, lo, lo + 1, hi - 1, hi, hi + 1] + powers:
            assert bool(pattern.fullmatch(str(i))) == (lo <= i <= hi), (bounds, i)


def test_plain_numbers():
    integer, number = schema_to_regex({"type": "integer"}), schema_to_regex({"type": "number"})
    for text in ["0", "-0", "7", "-1234567890123456789"]:
        assert re.fullmatch(integer, text) and re.fullmatch(number, text)
    for text in ["1.5", "-0.25e+10", "1E-7", "3.0"]:
        assert re.fullmatch(number, text) and not re.fullmatch(integer, text)
    for text in ["01", "1.", ".5", "+1", "1e", "--1", "0x10", "NaN", "Infinity", "12345678901234567890"]:
        assert not re.fullmatch(number, text), text


def test_strings_and_formats():
    regex = schema_to_regex({"type": "string", "minLength": 2, "maxLength": 3})
    for text in ['"ab"', '"\\n\\u00e9x"', '"é中"', r'"\"\\"']:
        assert re.fullmatch(regex, text), text
    for text in ['"a"', '"abcd"', '"\\u00e"', '"a\nb"', '"\\x41b"', "ab", '"ab']:
        assert not re.fullmatch(regex, text), text
    cases = {"date": (["2024-02-29"], ["2024-2-29", "2024-00-10", "2024-01-32"]),
             "time": (["12:00:00Z", "23:59:60.5-08:00"], ["24:00:00Z", "12:00:00", "12:60:00Z"]),
             "date-time": (["2024-01-01T10:20:30.123456+01:00"], ["2024-01-01 10:20:30Z"]),
             "uuid": (["123E4567-e89b-12d3-a456-426614174000"], ["123e4567e89b12d3a456426614174000"])}
    for fmt, (good, bad) in cases.items():
        regex = schema_to_regex({"type": "string", "format": fmt})
        assert all(re.fullmatch(regex, f'"{t}"') for t in good), fmt
        assert not any(re.fullmatch(regex, f'"{t}"') for t in bad), fmt
    regex = schema_to_regex({"type": "string", "pattern": "^(ab|cd)+$"})
    assert re.fullmatch(regex, '"abcd"') and not re.fullmatch(regex, '"abc"')


def test_enum_and_const():
    regex = schema_to_regex(SCHEMAS["enum"])
    for value in SCHEMAS["enum"]["enum"]:
        assert accepts(regex, value), value
    for text in ['"a"', "2", "2.50", '"ab"', "[1]", '{"k":{"n":[".x"]}}', "false", '"日本 \\"Q\\""']:
        assert not re.fullmatch(regex, text), text
    typed = schema_to_regex({"type": "string", "enum": ["x", 1]})  # values of other types cannot be written
    assert re.fullmatch(typed, '"x"') and not re.fullmatch(typed, "1")
    assert escape_literal("a.b*c\\d[e]-f(g){h}|i^j$k?l+m/n\"o é") == (
        "a\\.b\\*c\\\\d\\[e\\]\\-f\\(g\\)\\{h\\}\\|i\\^j\\$k\\?l\\+m/n\"o é")


def test_arrays():
    regex = schema_to_regex(SCHEMAS["numbers"])
    assert all(re.fullmatch(regex, t) for t in ["[1]", "[1,2.5,-3]", "[ 1 , 2 ]", "[\n  1\n]"])
    assert not any(re.fullmatch(regex, t) for t in ["[]", "[1,2,3,4]", "[1,]", "[,1]", '["1"]', "[1 2]"])
    rest = schema_to_regex(SCHEMAS["tuple_rest"])
    assert re.fullmatch(rest, '["head"]') and re.fullmatch(rest, '["head",1,2]')
    assert not re.fullmatch(rest, "[]") and not re.fullmatch(rest, '["head","x"]')
    empty = schema_to_regex({"type": "array", "items": False})
    assert re.fullmatch(empty, "[ ]") and not re.fullmatch(empty, "[1]")


def test_any_value_and_json_object():
    regex = json_object_regex()
    for text in ["{}", '{"a": [1, {"b": null}]}', '{ "x" : "y" , "z" : [ ] }', '{"a":{"b":{"c":{"d":1}}}}']:
        assert re.fullmatch(regex, text), text
    for text in ["[]", "1", '{"a":}', '{"a":1,}', "{a:1}", " {}", "{} ", '{"a":{"b":{"c":{"d":{"e":1}}}}}']:
        assert not re.fullmatch(regex, text), text
    assert_in_dialect(regex)
    shallow = schema_to_regex(True, any_depth=1)
    assert re.fullmatch(shallow, '[1, "a"]') and re.fullmatch(shallow, '{"a": 1, "b": "c"}')
    assert not re.fullmatch(shallow, "[[1]]") and not re.fullmatch(shallow, '[{"a": 1}]')
    assert len(json_object_regex()) < 50_000


def test_recursion():
    tree = schema_to_regex(SCHEMAS["tree"])
    node = {"v": 1}
    for depth in range(3):
        assert re.fullmatch(tree, compact(node)), depth
        node = {"v": depth, "kids": [node, {"v": 9, "kids": []}]}
    assert not re.fullmatch(tree, compact(node))  # four levels of nodes: past any_depth
    assert re.fullmatch(schema_to_regex(SCHEMAS["tree"], any_depth=5), compact(node))
    chain = {"type": "object", "properties": {"next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}}
    regex = schema_to_regex(chain)
    assert re.fullmatch(regex, '{"next":{"next":{"next":null}}}') and re.fullmatch(regex, "{}")
    node = {"type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"]}
    required = {"$defs": {"A": node}, "$ref": "#/$defs/A"}
    with pytest.raises(SchemaError, match=r"recursive.*any_depth=3"):
        schema_to_regex(required)


REFUSED = [
    ({"type": "number", "minimum": 0.5}, "'minimum'", "#:"),
    ({"properties": {"e": {"type": "number", "exclusiveMaximum": 3}}}, "'exclusiveMaximum'", "#/properties/e:"),
    ({"not": {}}, "'not'", "#:"),
    ({"type": "str"}, "'str'", "#:"),
    ({"type": "integer", "multipleOf": 2}, "'multipleOf'", "#:"),
    ({"allOf": [{}, {}]}, "'allOf'", "#:"),
    ({"type": "array", "items": {"uniqueItems": True}}, "'uniqueItems'", "#/items:"),
    ({"type": "object", "patternProperties": {"a": {}}}, "'patternProperties'", "#:"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, "'additionalProperties'",
     "#:"),
    ({"$ref": "https://example.com/s.json"}, "'$ref'", "#:"),
    ({"$ref": "#/$defs/Missing"}, "'$ref'", "#:"),
    ({"type": "string", "pattern": "(", "title": "t"}, "'pattern'", "#:"),
    ({"type": "string", "pattern": "a", "maxLength": 3}, "'maxLength'", "#:"),
    ({"type": "string", "minimum": 1}, "'minimum'", "#:"),
    ({"type": "object", "anyOf": [{}]}, "'anyOf'", "#:"),
    ({"$defs": {"X": {"type": "integer", "exclusiveMinimum": True}}, "$ref": "#/$defs/X"},
     "'exclusiveMinimum'", "#/$defs/X:"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "bounds", "#:"),
    ({"properties": {"a": {}}, "required": ["b"]}, "'b'", "#:"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "false", "#/properties/a:"),
    (False, "false", "#:"),
]


@pytest.mark.parametrize("schema,keyword,location", REFUSED)
def test_refused_with_keyword_and_location(schema, keyword, location):
    with pytest.raises(SchemaError) as info:
        schema_to_regex(schema)
    assert keyword in str(info.value) and str(info.value).startswith(location), str(info.value)


def test_unsatisfiable_branches_are_dropped():
    schema = {"type": "object", "properties": {"a": False, "b": {"type": "integer"}}}
    regex = schema_to_regex(schema)
    assert re.fullmatch(regex, '{"b":1}') and not re.fullmatch(regex, '{"a":1}')
    regex = schema_to_regex({"anyOf": [{"type": "integer", "minimum": 3, "maximum": 2}, {"type": "null"}]})
    assert regex == "null"
    regex = schema_to_regex({"type": "string", "nullable": True, "description": "x", "examples": ["a"]})
    assert re.fullmatch(regex, "null") and re.fullmatch(regex, '"a"')


def test_odd_names_and_literals():
    names = ["a.b", 'q"', "é/~", "(x)|[y]*", "\\", "-^$"]
    schema = {"$defs": {"a/b": {"type": "integer"}}, "type": "object", "required": names[:3],
              "properties": {n: {"$ref": "#/$defs/a~1b"} for n in names}}
    regex = schema_to_regex(schema)
    assert accepts(regex, {n: i for i, n in enumerate(names)})
    assert not re.fullmatch(regex, compact({"aXb": 1, 'q"': 2, "é/~": 3}))
    with pytest.raises(SchemaError, match="#/properties/é~1~0: keyword 'bogus'"):
        schema_to_regex({"properties": {"é/~": {"bogus": 1}}})
    rng = random.Random(1)
    pool = "\\.[](){}*+?|^$-/\"'#&~ aé中😀\n\t"
    for _ in range(300):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 10)))
        assert re.fullmatch(escape_literal(text), text), text


def test_any_depth_zero():
    regex = json_object_regex(any_depth=0)
    assert re.fullmatch(regex, '{"a": 1, "b": "x", "c": null}')
    assert not re.fullmatch(regex, '{"a": []}')
    assert schema_to_regex({}, any_depth=0) == schema_to_regex(True, any_depth=0)


@pytest.mark.parametrize("lo, hi", [(0, 1), (-2, 3), (-5, -1), (7, 7), (0, 100), (-1, 0)])
def test_number_between_whole_bounds(lo, hi):
    """minimum / maximum on a number (pydantic's ge / le): every decimal written without an exponent
    is accepted exactly when its value is in range (whole values also with a zero fraction)."""
    regex = schema_to_regex({"type": "number", "minimum": lo, "maximum": hi})
    rng = random.Random(lo * 31 + hi)
    for _ in range(3000):
        value = round(rng.uniform(lo - 3, hi + 3), rng.randint(0, 4))
        for text in {f"{value:.{rng.randint(1, 4)}f}", str(int(value)) if value == int(value) else str(value)}:
            if text in ("-0", "-0.0", "-0.00", "-0.000", "-0.0000"):
                continue  # the regex writes zero without its sign: a value it may refuse to spell
            assert bool(re.fullmatch(regex, text)) == (lo <= float(text) <= hi), text
    assert not re.fullmatch(regex, f"{lo}e0")  # exponents are left out where bounds apply


def test_unknown_formats_are_annotations_and_email_is_checked():
    assert re.fullmatch(schema_to_regex({"type": "string", "format": "hostname"}), '"any text"')
    email = schema_to_regex({"type": "string", "format": "email"})
    assert re.fullmatch(email, '"ada.lovelace+x@math.example.org"')
    assert not re.fullmatch(email, '"not an email"') and not re.fullmatch(email, '"a@b"')
