"""config/README.md's settings tables, written from the config schema (:mod:`llmret.schema`),
so a key, its default, its bounds and its description are written once, in the schema.

    python -m llmret.settings_doc          # rewrite the tables in config/README.md
    python -m llmret.settings_doc --check  # exit 1 naming every stale table, change nothing

A table sits between ``<!-- settings:ENTRY -->`` and ``<!-- /settings:ENTRY -->`` (ENTRY an
entry of :mod:`llmret.schema`: ``systems.dense``, ``lora``, ``datasets``...): one row per key
with its type, default, bounds or choices, and description. An object key without a
``$ref`` is listed key by key (``train.split``); a ``$ref`` to a shared block (``lora``,
``training``) and an entry with a table of its own (the FAISS ``index``) are one row.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from llmret import schema

README = Path(__file__).resolve().parents[2] / "config" / "README.md"
MARKER = re.compile(r"<!-- settings:(?P<entry>[\w.]+) -->\n(?P<body>.*?)<!-- /settings:(?P=entry) -->", re.DOTALL)
# Objects inside an entry that have a table of their own.
OWN_TABLES = ("systems.dense.index", "systems.sparse.sparse_index")
HEADER = "| key | type | default | bounds / choices | description |\n|---|---|---|---|---|"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _prose(text: str) -> str:
    """Schema text as Markdown: ``<`` outside code spans escaped (``</s>``, ``id<TAB>text``
    would be read as HTML)."""
    parts = str(text).split("`")
    return "`".join(p.replace("<", "&lt;") if i % 2 == 0 else p for i, p in enumerate(parts))


def _code(text: str) -> str:
    return f"`{text}`"


def value_text(value: object) -> str:
    """A value as the config's YAML writes it: ``null``, ``true``, ``[a, b]``, ``""``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    return repr(value)


def type_text(prop: Mapping) -> str:
    """The JSON type(s) of a property in words: ``integer``, ``string or null``, ``array of string``."""
    if "const" in prop:
        return _code(value_text(prop["const"]))
    if "oneOf" in prop:
        return " or ".join(dict.fromkeys(type_text(schema.resolve(alt)) for alt in prop["oneOf"]))
    types = list(schema.types_of(prop))
    if not types and "enum" in prop:
        types = list(dict.fromkeys("null" if v is None else "string" for v in prop["enum"]))
    words = []
    for t in types:
        if t == "array" and "type" in prop.get("items", {}):
            words.append(f"array of {type_text(prop['items'])}")
        else:
            words.append(t)
    return " or ".join(words)


def bounds_text(prop: Mapping) -> str:
    """Bounds and choices: ``>= 1``, ``in (0, 1]``, ```a`, `b```, a pattern, a minimum length."""
    if "enum" in prop:
        return ", ".join(_code(value_text(v)) for v in prop["enum"])
    if "oneOf" in prop:
        return " or ".join(b for alt in prop["oneOf"] if (b := bounds_text(schema.resolve(alt))))
    out = [schema.limits(prop)] if schema.limits(prop) else []
    if "pattern" in prop:
        out.append(f"matches {_code(prop['pattern'])}")
    if "minItems" in prop:
        out.append(f"at least {prop['minItems']} item{'' if prop['minItems'] == 1 else 's'}")
    return "; ".join(out)


def rows(entry: str) -> list[tuple[str, dict]]:
    """(key, resolved schema) of every row of ``entry``'s table, nested objects key by key."""
    node = schema.entry_node(entry)
    out = []
    for key, raw in node["properties"].items():
        prop = schema.resolve(raw)
        if set(raw) == {"const"}:
            continue  # a system's `type`: the section's heading says it
        nested = "properties" in prop and "$ref" not in raw and f"{entry}.{key}" not in OWN_TABLES
        if nested:
            out.extend((f"{key}.{sub}", p) for sub, p in rows(f"{entry}.{key}"))
        else:
            out.append((key, prop))
    return out


def table(entry: str) -> str:
    """The Markdown table of ``entry``'s settings."""
    required = set(schema.entry_node(entry).get("required", ()))
    lines = [HEADER]
    for key, prop in rows(entry):
        if "default" in prop:
            default = _code(value_text(prop["default"]))
        else:
            default = "required" if key in required else ""
        cells = (_code(key), type_text(prop), default, bounds_text(prop), _prose(prop.get("description", "")))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def rewrite(text: str) -> tuple[str, list[str]]:
    """``text`` with every marked table written afresh, and the entries whose table changed."""
    stale = []

    def fill(match: re.Match) -> str:
        entry = match["entry"]
        body = f"\n{table(entry)}\n\n"
        if match["body"] != body:
            stale.append(entry)
        return f"<!-- settings:{entry} -->\n{body}<!-- /settings:{entry} -->"

    new = MARKER.sub(fill, text)
    opened = re.findall(r"<!-- settings:([\w.]+) -->", text)
    closed = [m["entry"] for m in MARKER.finditer(text)]
    if opened != closed:
        raise ValueError(f"settings markers without their closing marker: {sorted(set(opened) - set(closed))}")
    return new, stale


def entries(text: str) -> list[str]:
    """The entries that ``text`` has a table of."""
    return [m["entry"] for m in MARKER.finditer(text)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmret.settings_doc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 naming the stale tables; change nothing")
    parser.add_argument("--readme", type=Path, default=README, help="the file to fill (default: %(default)s)")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    try:
        new, stale = rewrite(text)
    except (KeyError, ValueError) as err:
        print(f"{args.readme}: {err}", file=sys.stderr)
        return 2
    if args.check:
        if stale:
            print(
                f"{args.readme}: stale settings table(s): {', '.join(stale)} (run python -m llmret.settings_doc)",
                file=sys.stderr,
            )
            return 1
        return 0
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: {len(entries(new))} tables, {len(stale)} rewritten ({', '.join(stale) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
