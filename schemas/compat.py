"""Avro schema compatibility by the spec's resolution rules, without reading data.

``problems(writer, reader)`` lists why data written with ``writer`` could not be
read with ``reader`` (empty: it can). A new schema version is *backward*
compatible with an old one when ``problems(old, new)`` is empty (the new reader
reads old records: a rolling upgrade, a replay of old topics) and *forward*
compatible when ``problems(new, old)`` is empty (workers not upgraded yet read the
new records). The pipeline needs both for every released version
(``tests/unit/test_schema_evolution.py``).

The rules are those of the Avro specification's "Schema Resolution": same
primitive or a promotion (int -> long, float, double; long -> float, double;
float -> double; string <-> bytes); records match by name and every reader field
is in the writer (by name or alias) or has a default; enums keep the writer's
symbols or have a default; arrays and maps by their items and values; fixed by
name and size; every writer union branch must resolve to the reader.
"""

from __future__ import annotations

from typing import Any

PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_NAMED = frozenset({"record", "error", "enum", "fixed"})


def problems(writer: Any, reader: Any) -> list[str]:
    """Why records written with ``writer`` cannot be read with ``reader``; [] if they can.

    Both are Avro schemas as JSON values (parsed by fastavro or not). Each
    problem names the path of the field it concerns.
    """
    w_names: dict[str, Any] = {}
    r_names: dict[str, Any] = {}
    _collect(writer, "", w_names)
    _collect(reader, "", r_names)
    out: list[str] = []
    _Check(w_names, r_names, out).check(writer, reader, "", "")
    return out


def _full(name: str, namespace: str) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _collect(schema: Any, namespace: str, names: dict[str, Any]) -> None:
    """Every named type of ``schema`` by its full name (later references are strings)."""
    if isinstance(schema, list):
        for branch in schema:
            _collect(branch, namespace, names)
        return
    if not isinstance(schema, dict):
        return
    kind = schema.get("type")
    if isinstance(kind, (dict, list)):
        _collect(kind, namespace, names)
        return
    if kind in _NAMED:
        full = _full(str(schema["name"]), str(schema.get("namespace", namespace)))
        names[full] = schema
        namespace = full.rpartition(".")[0]
        for field in schema.get("fields", ()):
            _collect(field["type"], namespace, names)
    elif kind == "array":
        _collect(schema["items"], namespace, names)
    elif kind == "map":
        _collect(schema["values"], namespace, names)


def _short(name: str) -> str:
    return name.rpartition(".")[2]


class _Check:
    def __init__(self, w_names: dict[str, Any], r_names: dict[str, Any], out: list[str]) -> None:
        self.w_names = w_names
        self.r_names = r_names
        self.out = out
        self.seen: set[tuple[str, str]] = set()

    def _deref(self, schema: Any, names: dict[str, Any], namespace: str) -> Any:
        if isinstance(schema, str) and schema not in PRIMITIVES:
            found = names.get(_full(schema, namespace)) or names.get(schema)
            if found is None:
                # an unknown name: report it as its own kind so that nothing matches it
                return {"type": f"<unknown {schema}>"}
            return found
        if isinstance(schema, dict) and isinstance(schema.get("type"), (dict, list)):
            return self._deref(schema["type"], names, namespace)
        if isinstance(schema, dict) and schema.get("type") in PRIMITIVES:
            return schema["type"]  # logical types read as their underlying type
        return schema

    @staticmethod
    def _kind(schema: Any) -> str:
        if isinstance(schema, str):
            return schema
        if isinstance(schema, list):
            return "union"
        return str(schema.get("type"))

    def _matches(self, w: Any, r: Any) -> bool:
        """Whether union branch ``r`` is the one a writer value of ``w`` resolves to."""
        wk, rk = self._kind(w), self._kind(r)
        if wk in _NAMED or rk in _NAMED:
            return wk == rk and _short(str(w["name"])) in self._names_of(r)
        return wk == rk or rk in PROMOTIONS.get(wk, frozenset())

    @staticmethod
    def _names_of(r: Any) -> set[str]:
        return {_short(str(r["name"]))} | {_short(str(a)) for a in r.get("aliases", ())}

    def check(self, writer: Any, reader: Any, path: str, namespace: str) -> None:
        w = self._deref(writer, self.w_names, namespace)
        r = self._deref(reader, self.r_names, namespace)
        wk, rk = self._kind(w), self._kind(r)
        where = path or "<root>"
        if wk == "union":
            for branch in w:
                self.check(branch, r, path, namespace)
            return
        if rk == "union":
            branches = [self._deref(b, self.r_names, namespace) for b in r]
            match = next((b for b in branches if self._matches(w, b)), None)
            if match is None:
                self.out.append(f"{where}: writer type {wk} matches no branch of the reader union")
            else:
                self.check(w, match, path, namespace)
            return
        if wk in PRIMITIVES or rk in PRIMITIVES:
            if wk != rk and rk not in PROMOTIONS.get(wk, frozenset()):
                self.out.append(f"{where}: writer {wk} cannot be read as {rk}")
            return
        if wk != rk:
            self.out.append(f"{where}: writer {wk} cannot be read as {rk}")
            return
        if wk == "array":
            self.check(w["items"], r["items"], f"{path}[]", namespace)
        elif wk == "map":
            self.check(w["values"], r["values"], f"{path}{{}}", namespace)
        elif wk in _NAMED:
            if _short(str(w["name"])) not in self._names_of(r):
                self.out.append(f"{where}: writer {wk} {w['name']} is not reader's {r['name']}")
                return
            if wk == "fixed" and w.get("size") != r.get("size"):
                self.out.append(f"{where}: fixed size {w.get('size')} read as {r.get('size')}")
            elif wk == "enum":
                lost = [s for s in w.get("symbols", ()) if s not in r.get("symbols", ())]
                if lost and "default" not in r:
                    self.out.append(f"{where}: reader enum lacks symbols {lost} and no default")
            elif wk in ("record", "error"):
                self._record(w, r, path, namespace)
        else:
            self.out.append(f"{where}: unsupported type {wk}")

    def _record(self, w: dict[str, Any], r: dict[str, Any], path: str, namespace: str) -> None:
        pair = (str(w["name"]), str(r["name"]))
        if pair in self.seen:
            return  # a recursive record: its fields are being checked already
        self.seen.add(pair)
        inner = _full(str(r["name"]), str(r.get("namespace", namespace))).rpartition(".")[0]
        by_name = {f["name"]: f for f in w.get("fields", ())}
        for field in r.get("fields", ()):
            names = [field["name"], *field.get("aliases", ())]
            found = next((by_name[n] for n in names if n in by_name), None)
            sub = f"{path}.{field['name']}" if path else str(field["name"])
            if found is not None:
                self.check(found["type"], field["type"], sub, inner)
            elif "default" not in field:
                self.out.append(f"{sub}: reader field is not in the writer and has no default")
