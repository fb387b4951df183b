"""Typed command-line flags from a dataclass: the one parser behind train.py and every `lmdist` command.

A dataclass is the table of a command's flags: each field is declared with `option(default, help, group)`
(a field without a default is required) and typed bool, int, float, str, a Literal of choices, or one of
those or None. Flags are `--FIELD VALUE` or `--FIELD=VALUE`, and for booleans also `--FIELD` / `--noFIELD`.
A table may declare one positional field (`option(..., positional="RUN_DIR")`, typed tuple[str, ...]): it
takes every bare argument, in order, wherever it stands among the flags; a boolean flag of such a table then
takes a value only as `--FIELD=VALUE`, so that `--log_y RUN_DIR` reads as a flag and a run.
Values are coerced strictly, because a command line and YAML hand over loosely typed values --
`--tie_weights false` is the truthy string 'false', `--n 3.5` a float for an int field. Every problem is a
ConfigError (exit status 2) that names the flag, and an unknown name comes with the closest known one.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Any, Literal

from lmdist.errors import ConfigError


def option(default: Any = dataclasses.MISSING, help: str = "", group: str = "options",
           positional: str | None = None) -> Any:
    """A flag's field: its default (none: the flag is required), what it means and its group in --help;
    `positional` makes it the field of the bare arguments, shown in --help by that name (RUN_DIR)."""
    return field(default=default, metadata={"help": help, "group": group, "positional": positional})


def need(ok: bool, values: Any, name: str, what: str) -> None:
    """Refuse the value of field `name` of `values` unless `ok`, saying what would be valid."""
    if not ok:
        raise ConfigError(f"--{name} {getattr(values, name)!r}: {what}")


class Flags:
    """The flags of one dataclass `table`: split a command line, coerce and validate values, describe them.

    `validate` checks a built instance; `extra` names flags that take a value and are no field (train.py's
    `--config`); `renamed` maps an old field name to its new one, refused with the new name as a flag.
    """

    def __init__(self, table: type, validate: Callable[[Any], None] | None = None, extra: tuple[str, ...] = (),
                 renamed: dict[str, str] | None = None):
        self.table, self.validate, self.extra, self.renamed = table, validate, extra, renamed or {}
        self.fields = {f.name: f for f in dataclasses.fields(table)}
        self.types = typing.get_type_hints(table)
        self.positional = next((f.name for f in self.fields.values() if f.metadata.get("positional")), None)

    def usage(self) -> str:
        """What follows the command's name: `RUN_DIR [RUN_DIR ...] [--FIELD VALUE ...]`."""
        bare = self.fields[self.positional].metadata["positional"] if self.positional else None
        return (f"{bare} [{bare} ...] " if bare else "") + "[--FIELD VALUE ...]"

    def display(self, name: str) -> str:
        """How field `name` is written on a command line: --FIELD, or the positional field's RUN_DIR."""
        return self.fields[name].metadata["positional"] if name == self.positional else f"--{name}"

    def parse(self, argv: list[str]) -> Any:
        """The instance for `--FIELD VALUE` flags (none of them `extra`)."""
        return self.make(self.split(argv))

    def make(self, values: dict[str, Any], source: str = "flag") -> Any:
        """Coerce and validate `values` (field name -> raw value) into an instance of the table."""
        for name in values:
            if name not in self.fields:
                raise ConfigError(f"unknown {source} --{name}{self.suggestion(name)} (see --help)")
        coerced = {name: self.coerce(name, raw) for name, raw in values.items()}
        for name, f in self.fields.items():
            if f.default is dataclasses.MISSING and name not in coerced:
                raise ConfigError(f"{self.display(name)} is required: {f.metadata['help']} (see --help)")
        made = self.table(**coerced)
        if self.validate:
            self.validate(made)
        return made

    def split(self, argv: list[str]) -> dict[str, Any]:
        """`--k v`, `--k=v`, `--flag` and `--noflag` (booleans) into {k: raw string or bool}; bare arguments into
        {positional field: [raw strings]}."""
        flags: dict[str, Any] = {}
        i = 0
        while i < len(argv):
            arg = argv[i]
            if not arg.startswith("--") or arg == "--":
                if self.positional is None or arg == "--":
                    raise ConfigError(f"unexpected argument {arg!r}: every setting is a flag, --FIELD VALUE "
                                      "(see --help)")
                flags.setdefault(self.positional, []).append(arg)
                i += 1
                continue
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            if not eq:
                if name.startswith("no") and self._is_bool(name[2:]):
                    name, value = name[2:], False
                elif self._is_bool(name) and (self.positional or i + 1 == len(argv) or argv[i + 1].startswith("--")):
                    value = True
                elif i + 1 < len(argv):
                    i += 1
                    value = argv[i]
                else:
                    raise ConfigError(f"flag --{name} needs a value")
            if name in self.renamed:
                raise ConfigError(f"--{name} was renamed --{self.renamed[name]}: use --{self.renamed[name]} {value}")
            if name == self.positional:
                raise ConfigError(f"--{name} is no flag: give each {self.display(name)} bare (usage: {self.usage()})")
            if name not in self.extra and name not in self.fields:
                raise ConfigError(f"unknown flag --{name}{self.suggestion(name)} (see --help)")
            flags[name] = value  # a flag given again wins, as with argparse: overrides are appended to a command
            i += 1
        return flags

    def suggestion(self, name: str) -> str:
        names = [n for n in [*self.fields, *self.extra] if n != self.positional]  # no flag of its own
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        return f"; did you mean --{close[0]}?" if close else ""

    def _is_bool(self, name: str) -> bool:
        return name in self.fields and _base_type(self.types[name]) is bool

    def coerce(self, name: str, raw: Any) -> Any:
        tp = self.types[name]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
        if optional and (raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null", ""))):
            return None
        base = _base_type(tp)
        try:
            if name == self.positional:
                return tuple(_coerce_str(item) for item in raw)
            if typing.get_origin(base) is Literal:
                return _coerce_choice(raw, typing.get_args(base))
            return {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}[base](raw)
        except ValueError as e:
            raise ConfigError(f"--{name}: {e}") from None

    # ------------------------------------------------------------------------- help

    def help_text(self, intro: list[str]) -> str:
        """`intro`, then every field with its type, default and meaning, by group."""
        lines, group = list(intro), None
        for f in self.fields.values():
            if f.metadata["group"] != group:
                group = f.metadata["group"]
                lines += ["", f"{group}:"]
            default = "required" if f.default is dataclasses.MISSING else f"default: {f.default}"
            kind = "..." if f.name == self.positional else self.type_name(f.name)
            lines.append(f"  {self.display(f.name)} {kind} ({default})")
            lines.append(f"      {f.metadata['help'].replace('`', '')}")
        return "\n".join(lines)

    def type_name(self, name: str) -> str:
        tp = self.types[name]
        base = _base_type(tp)
        text = "|".join(typing.get_args(base)) if typing.get_origin(base) is Literal else base.__name__
        return text + ("|none" if base is not tp else "")

    def markdown_table(self) -> str:
        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")

        rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in self.fields.values():
            rows.append(f"| `{f.name}` | {cell(self.type_name(f.name))} | `{f.default}` | {cell(f.metadata['help'])} |")
        return "\n".join(rows)


def _base_type(tp: Any) -> Any:
    """`Optional[int]` -> int; other types unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _coerce_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expects true or false, got {raw!r}")


def _coerce_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"expects an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    try:
        return int(str(raw).strip())
    except ValueError:
        raise ValueError(f"expects an integer, got {raw!r}") from None


def _coerce_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"expects a number, got {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"expects a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expects a finite number, got {raw!r}")
    return value


def _coerce_str(raw: Any) -> str:
    if isinstance(raw, (dict, list)):
        raise ValueError(f"expects a string, got {raw!r}")
    return str(raw)


def _coerce_choice(raw: Any, choices: tuple[str, ...]) -> str:
    text = str(raw).strip().lower()
    if text not in choices:
        close = difflib.get_close_matches(text, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"expects one of {', '.join(choices)}, got {raw!r}{hint}")
    return text
