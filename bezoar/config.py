"""Configs as nested dataclasses, read from TOML with dotted ``key=value`` overrides.

The mechanism is generic: a caller (the trainer, a recipe) defines its own dataclasses and
calls ``load_config(RootConfig, "stage.toml", ["optim.lr=2e-4", "data.path=x.jsonl"])``.

- Field types are checked: ``int``, ``float`` (an int is accepted and widened), ``bool``,
  ``str``, ``Optional[...]`` / ``X | None``, ``Literal[...]``, ``list[X]``, ``tuple[X, ...]``,
  ``dict[str, X]``, unions of those, and nested dataclasses (TOML tables).
- An unknown key, a wrong type or a missing required key raises ``ConfigError`` naming the
  dotted key and where it came from (``file:line`` for keys in a file, or the override text).
- An override's value is parsed as a TOML value (``lr=2e-4`` is a float, ``tags=["a","b"]`` a
  list, ``fields={instruction="q"}`` a table); what does not parse is kept as a bare string
  (``out=runs/x``). A bare ``none`` or ``null`` sets a field that may be None (``Optional[...]``) back to None;
  for any other field it stays the string it always was, and ``key="none"`` is the string for every field.
- ``dump_toml(obj)`` writes the resolved config so that ``load_config`` reads it back equal.
  TOML has no null: a field holding ``None`` is written as a comment and must default to None.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Union

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "dump_toml", "parse_override", "set_dotted"]


class ConfigError(ValueError):
    """A config the user wrote cannot be used; the message names the key and its source."""


_MISSING = object()
_NULLS = ("none", "null")  # how an override spells None, bare (TOML has no null)


# ---- where keys come from (file lines, override texts) ----------------------------------------------


_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_KEY_RE = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")
_TABLE_RE = re.compile(rf"^\s*\[\[?\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*\]\]?")


def _split_key(text: str) -> list[str]:
    parts = re.findall(_KEY_PART, text)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted key -> 1-based line of its definition (tables and ``key =`` lines).

    A cheap scan, not a parser: keys inside multi-line strings or inline tables may be missed,
    and then a message falls back to the line of the nearest enclosing key that was found.
    """
    lines: dict[str, int] = {}
    table: list[str] = []
    in_multiline = None
    for n, line in enumerate(text.splitlines(), start=1):
        if in_multiline:
            in_multiline = _open_multiline(line, in_multiline)
            continue
        m = _TABLE_RE.match(line)
        if m:
            table = _split_key(m.group(1))
            lines.setdefault(".".join(table), n)
            continue
        m = _KEY_RE.match(line)
        if m:
            path = ".".join(table + _split_key(m.group(1)))
            lines.setdefault(path, n)
        in_multiline = _open_multiline(line[m.end():] if m else line)  # (a line of a multi-line array: all of it)
    return lines


def _open_multiline(text: str, inside: str | None = None) -> str | None:
    """The multi-line string delimiter (three double or three single quotes) left open at the end of ``text``, a
    line of TOML or of its value, read from inside such a string when ``inside`` names its delimiter; None when
    none is open. Triple quotes inside a one-line string (a literal string of three double quotes, say) or a
    comment open nothing."""
    i, n = 0, len(text)
    while i < n:
        if inside:
            if inside == '"""' and text[i] == "\\":
                i += 2  # an escaped character (a quote, say) does not close it
            elif text.startswith(inside, i):
                i += 3
                for _ in range(2):  # a run of up to five quotes closes it with its last three
                    if i < n and text[i] == inside[0]:
                        i += 1
                inside = None
            else:
                i += 1
            continue
        c = text[i]
        if c == "#":
            break
        if text.startswith('"""', i) or text.startswith("'''", i):
            inside, i = text[i:i + 3], i + 3
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif c == "'":
            end = text.find("'", i + 1)
            i = n if end < 0 else end + 1
        else:
            i += 1
    return inside


class _Sources:
    """Says where a dotted key was set: an override, a file line, or just the file."""

    def __init__(self, file: str | None = None, text: str | None = None):
        self.file = file
        self.lines = _key_lines(text) if text is not None else {}
        self.overrides: dict[str, str] = {}
        self.nulls: set[str] = set()  # keys an override set to a bare none or null

    def describe(self, path: str) -> str:
        """Where ``path`` was set: the override that set it or a key above it, else its line in the file (or the
        line of the nearest key above it that was found), else the file. A list item (``lora.targets[1]``) was
        set with its list."""
        path = _strip_items(path)
        for probe in _probes(path):
            if probe in self.overrides:
                return f"command-line override {self.overrides[probe]!r}"
        for key, text in self.overrides.items():  # an override that made this key a table
            if key.startswith(path + "."):
                return f"command-line override {text!r}"
        if self.file is None:
            return "config"
        for probe in _probes(path):
            if probe in self.lines:
                return f"{self.file}:{self.lines[probe]}"
        return self.file


def _strip_items(path: str) -> str:
    """``"a.b[0][2]"`` -> ``"a.b"``: the key that holds a list item."""
    return re.sub(r"(\[\d+\])+$", "", path)


def _probes(path: str):
    """``"a.b[1].c"`` -> ``"a.b[1].c"``, ``"a.b"``, ``"a"``: the key and the keys above it, list items cut off."""
    probe = _strip_items(path)
    while probe:
        yield probe
        probe = _strip_items(probe.rpartition(".")[0])


# ---- overrides ------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)``; the value is TOML if it parses, else the bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE (e.g. optim.lr=2e-4)")
    if not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", key):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted key (letters, digits, _ and - between dots)")
    raw = raw.strip()
    try:
        doc = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return key, raw
    if set(doc) != {"v"}:  # "1\nx = 2": more than one value, kept whole rather than cut to its first line
        return key, raw
    return key, doc["v"]


def set_dotted(d: dict, key: str, value: Any, origin: str = "override") -> None:
    """Set ``d["a"]["b"] = value`` for key ``"a.b"``, creating tables on the way."""
    parts = key.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{origin}: key {'.'.join(parts[: i + 1])!r} is a value, not a table, "
                              f"so {key!r} cannot be set")
        node = child
    node[parts[-1]] = value


# ---- type checking ---------------------------------------------------------------------------------


def _type_name(tp) -> str:
    if tp is type(None):
        return "none"
    if dataclasses.is_dataclass(tp):
        return f"table ({tp.__name__})"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe_value(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_union(tp) -> bool:
    origin = typing.get_origin(tp)
    return origin is Union or (hasattr(types, "UnionType") and origin is getattr(types, "UnionType"))


def _convert(tp, value, path: str, sources: _Sources):
    """Return ``value`` checked (and, for int -> float and tables -> dataclasses, converted) as ``tp``."""
    where = sources.describe(path)

    def wrong(expected: str | None = None):
        raise ConfigError(f"{where}: key {path!r} must be {expected or _type_name(tp)}, got {_describe_value(value)}")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            wrong()
        return _build(tp, value, path, sources)
    if _is_union(tp):
        options = typing.get_args(tp)
        if value is None or (path in sources.nulls and value in _NULLS and type(None) in options):
            if type(None) in options:
                return None
            wrong()
        errors = []
        # Try the exact-type options first so that `int | str` keeps 3 an int, `float | str` widens 3.
        ordered = sorted((o for o in options if o is not type(None)),
                         key=lambda o: 0 if (isinstance(o, type) and type(value) is o) else 1)
        for option in ordered:
            try:
                return _convert(option, value, path, sources)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            if type(None) in options and any(p in sources.overrides for p in _probes(path)):
                raise ConfigError(f"{errors[0]} (or none: {_strip_items(path)}=none sets it to None)") from None
            raise errors[0]
        wrong(" or ".join(_type_name(o) for o in options))
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and any(type(value) is type(a) for a in allowed if a == value):
            return value
        wrong("one of " + ", ".join(repr(a) for a in allowed))
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            wrong()
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                wrong(f"a list of {len(args)} items")
            items = [_convert(a, v, f"{path}[{i}]", sources) for i, (a, v) in enumerate(zip(args, value))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, f"{path}[{i}]", sources) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            wrong("a table")
        args = typing.get_args(tp)
        value_tp = args[1] if len(args) == 2 else Any
        return {str(k): _convert(value_tp, v, f"{path}.{k}", sources) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        wrong("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        wrong("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        wrong("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        wrong("a string")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        wrong("a path string")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: key {path!r} has a type the config loader does not handle: {_type_name(tp)}")


def _build(cls, data: dict, prefix: str, sources: _Sources):
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:
        raise TypeError(f"{cls.__name__}: its annotations cannot be resolved ({e}); "
                        "define config dataclasses at module level") from None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            path = f"{prefix}.{key}" if prefix else key
            known = ", ".join(sorted(fields)) or "(none)"
            raise ConfigError(f"{sources.describe(path)}: unknown key {path!r}; "
                              f"{'table ' + repr(prefix) if prefix else 'the top level'} takes: {known}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], path, sources)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, path, sources)
            else:
                where = sources.describe(prefix) if prefix else (sources.file or "config")
                raise ConfigError(f"{where}: required key {path!r} is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a __post_init__ check of the caller's dataclass
        key = _key_named_by(str(e), prefix, fields)
        if key is not None:
            where = sources.describe(key)
        else:
            where = sources.describe(prefix) if prefix else (sources.file or "config")
        raise ConfigError(f"{where}: {'table ' + repr(prefix) + ': ' if prefix else ''}{e}") from None


def _key_named_by(message: str, prefix: str, fields) -> str | None:
    """The dotted key a ``__post_init__`` message starts with (``"train.grad_accum must ..."``, or a field
    of the table alone: ``"concurrency must ..."``), so that the error points at the source of that key
    rather than at whichever key of the table was set first; None when it names none of the table's fields."""
    m = re.match(r"[A-Za-z_][A-Za-z0-9_.-]*", message)
    if m is None:
        return None
    word = m.group(0).rstrip(".")
    if prefix and word.startswith(prefix + "."):
        word = word[len(prefix) + 1:]
    if word.split(".", 1)[0] not in fields:
        return None
    return f"{prefix}.{word}" if prefix else word


# ---- public API -------------------------------------------------------------------------------------


def from_dict(cls, data: dict, source: str | None = None, overrides: Iterable[str] = (),
              shown: dict[str, str] | None = None):
    """Build dataclass ``cls`` from a nested dict (a parsed TOML document) plus override texts."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    sources = _Sources(file=source)
    return _from_dict(cls, dict(data), sources, overrides, shown)


def _from_dict(cls, data: dict, sources: _Sources, overrides: Iterable[str], shown: dict[str, str] | None = None):
    data = _deep_copy(data)
    for text in overrides:
        key, value = parse_override(text)
        typed = (shown or {}).get(text, text)
        set_dotted(data, key, value, origin=f"override {typed!r}")
        sources.overrides[key] = typed
        if value in _NULLS and text.partition("=")[2].strip() == value:  # bare, not quoted
            sources.nulls.add(key)
        else:
            sources.nulls.discard(key)
    return _build(cls, data, "", sources)


def load_config(cls, path: str | Path | None = None, overrides: Iterable[str] = (),
                shown: dict[str, str] | None = None):
    """Read TOML file ``path`` (or nothing: defaults only) into ``cls`` and apply ``overrides``. ``shown`` maps
    an override to the text that messages quote for it, when the user typed another (a recipe applies
    ``<stage>.key=value`` to that stage as ``key=value``)."""
    if path is None:
        return _from_dict(cls, {}, _Sources(), overrides, shown)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: " + ("is a folder, not a config file" if path.is_dir() else "config file not found"))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.start}); TOML files are UTF-8: save it as "
                          "UTF-8 (not UTF-16 or a legacy code page)") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return _from_dict(cls, data, _Sources(file=str(path), text=text), overrides, shown)


def _deep_copy(d):
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _plain(v):
    """Dataclasses -> dicts, tuples -> lists, paths -> strings, recursively."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def to_dict(obj) -> dict:
    """A dataclass instance as plain nested dicts/lists/scalars (tuples become lists, paths strings)."""
    return _plain(obj)


# ---- TOML writer ----------------------------------------------------------------------------------


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_COMMENT_FORBIDS = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # the control characters but tab


def _toml_string(text: str, path: str) -> str:
    """``text`` as a TOML basic string. JSON's escapes are all TOML's, and JSON escapes every control character
    TOML forbids in a string but DEL (U+007F), escaped here (tomllib refuses the raw character). A lone
    surrogate (an undecodable byte of a command line, say) has no TOML spelling at all: a ConfigError."""
    bad = _LONE_SURROGATE.search(text)
    if bad:
        raise ConfigError(f"key {path!r}: holds U+{ord(bad.group()):04X}, a lone surrogate (an undecodable byte?), "
                          "which TOML cannot hold")
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key, key)


def _comment_text(line: str) -> str:
    """One line of text as a TOML comment may hold it: the control characters TOML forbids there as ``\\uXXXX``."""
    return _COMMENT_FORBIDS.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def _toml_value(v, path: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v, path)
    if isinstance(v, (list, tuple)):
        if any(x is None for x in v):
            raise ConfigError(f"key {path!r}: TOML cannot hold None inside a list")
        return "[" + ", ".join(_toml_value(x, f"{path}[{i}]") for i, x in enumerate(v)) + "]"
    if isinstance(v, dict):
        items = [f"{_toml_key(k)} = {_toml_value(x, f'{path}.{k}')}" for k, x in v.items() if x is not None]
        return "{" + ", ".join(items) + "}"
    raise ConfigError(f"key {path!r}: cannot write a {type(v).__name__} to TOML")


def dump_toml(obj, header: str | None = None) -> str:
    """The resolved config as TOML text that ``load_config(type(obj), ...)`` reads back equal."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError("dump_toml takes a dataclass instance")
    out: list[str] = []
    if header:
        out.extend(f"# {_comment_text(line)}" if line else "#" for line in header.splitlines())
        out.append("")

    def is_table(v) -> bool:
        return (dataclasses.is_dataclass(v) and not isinstance(v, type)) or (
            isinstance(v, dict) and any(isinstance(x, dict) for x in v.values()))

    def write_table(node, prefix: list[str]):
        if dataclasses.is_dataclass(node):
            items = [(f.name, getattr(node, f.name), f) for f in dataclasses.fields(node) if f.init]
        else:
            items = [(k, v, None) for k, v in node.items()]
        scalars = [(k, v, f) for k, v, f in items if not is_table(v)]
        tables = [(k, v) for k, v, f in items if is_table(v)]
        if prefix:
            if out and out[-1] != "":
                out.append("")
            out.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for key, value, f in scalars:
            path = ".".join(prefix + [key])
            if value is None:
                if f is not None and f.default is not None and f.default is not dataclasses.MISSING:
                    raise ConfigError(f"key {path!r} is None but defaults to {f.default!r}: "
                                      "TOML has no null, so it could not be read back; default it to None")
                out.append(f"# {_toml_key(key)} is unset (None)")
                continue
            out.append(f"{_toml_key(key)} = {_toml_value(_plain(value), path)}")
        for key, value in tables:
            write_table(value, prefix + [key])

    write_table(obj, [])
    return "\n".join(out).rstrip() + "\n"



def environment_error() -> str | None:
    """Why the kernels' ``BEZOAR_*`` environment settings cannot be used (the variable named), or None: each
    ``python -m bezoar.*`` command that runs the model asks before it starts work."""
    from bezoar_kernels.dispatch import check_environment

    try:
        check_environment()
    except ValueError as e:
        return str(e)
    return None
