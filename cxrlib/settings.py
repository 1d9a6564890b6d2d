"""Settings dataclasses from mappings, notebook parameters and command lines.

A stage's or a training loop's knobs are one ``@dataclass``; each knob is defined once, as a
field with its default and its help text (``field(default=..., metadata={"help": "..."})``).
These helpers build such a dataclass from the other places a setting arrives from:

- :func:`from_mapping`: a plain mapping of field names (``config.json``, a YAML profile);
- :func:`from_params`: a notebook's UPPER_CASE parameters (``EPOCHS`` -> ``epochs``);
- :func:`add_arguments` / :func:`from_arguments`: one ``--kebab-case`` command-line option
  per field, with type, default and help taken from the field;
- :func:`setting`: a field with its help text, ``lr: float = setting(1e-3, "AdamW learning rate")``.

Field metadata the command-line helpers read: ``help`` (text), ``choices`` (allowed values;
a ``Literal`` annotation gives them too) and ``aliases`` (further option strings that
keep an older spelling working, e.g. ``("--channels",)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_NONE = type(None)


def _check_dataclass(cls: Any) -> None:
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass type, got {cls!r}")


def _hints(cls: type) -> dict[str, Any]:
    """Resolved field annotations (modules use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(hint, False)``."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        args = [arg for arg in typing.get_args(hint) if arg is not _NONE]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _convert(hint: Any, value: Any, strict: bool) -> Any:
    """``value`` shaped for a field annotated ``hint``: nested dataclasses built, lists -> tuples."""
    inner, _ = _strip_optional(hint)
    if value is None:
        return value
    if isinstance(inner, type) and dataclasses.is_dataclass(inner) and isinstance(value, Mapping):
        return from_mapping(inner, value, strict=strict)
    if (inner is tuple or typing.get_origin(inner) is tuple) and isinstance(value, list):
        return tuple(value)
    return value


def from_mapping(cls: type[T], values: Mapping[str, Any], *, strict: bool = True) -> T:
    """An instance of the dataclass ``cls`` from a mapping of field names to values.

    Keys that name no field raise ValueError naming them and ``cls`` (``strict=False``
    ignores them, e.g. for a ``config.json`` written by a newer version). A field typed as a
    dataclass takes a mapping, built the same way; a list given for a tuple-typed field
    becomes a tuple (JSON and YAML know no tuples). Missing fields keep their defaults.
    """
    _check_dataclass(cls)
    if not isinstance(values, Mapping):
        raise TypeError(f"{cls.__name__} settings must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(key) for key in values if key not in fields)
    if unknown and strict:
        raise ValueError(f"unknown {cls.__name__} settings: {', '.join(unknown)} "
                         f"(known: {', '.join(fields)})")
    hints = _hints(cls)
    return cls(**{name: _convert(hints[name], value, strict) for name, value in values.items() if name in fields})


def from_params(cls: type[T], params: Mapping[str, Any], names: Mapping[str, str] | None = None) -> T:
    """An instance of ``cls`` from notebook parameters.

    Field ``x`` takes ``params[names.get(x, x.upper())]`` when that key is present and keeps
    its default otherwise (so ``EPOCHS`` sets ``epochs``; ``names={"lr": "LEARNING_RATE"}``
    maps a differently spelt parameter). Values are shaped as in :func:`from_mapping`.
    """
    _check_dataclass(cls)
    names = names or {}
    values = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        key = names.get(field.name, field.name.upper())
        if key in params:
            values[field.name] = params[key]
    return from_mapping(cls, values)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            choices: Sequence[Any] | None = None, aliases: Sequence[str] = ()) -> Any:
    """A dataclass field with its help text (and optional ``choices`` / option ``aliases``).

    ``epochs: int = setting(10, "passes over the training images")``; ``factory`` instead of
    ``default`` for mutable defaults (``setting(factory=dict, help=...)``).
    """
    metadata: dict[str, Any] = {"help": help} if help else {}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if aliases:
        metadata["aliases"] = tuple(aliases)
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def option_name(field_name: str) -> str:
    """The command-line option of a field: ``max_steps_per_epoch`` -> ``--max-steps-per-epoch``."""
    return "--" + field_name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: Sequence[str] = (),
                  defaults: Mapping[str, Any] | None = None) -> None:
    """Add one ``--kebab-case`` option per field of the dataclass ``cls`` to ``parser``.

    The option's type comes from the annotation: ``bool`` -> ``--flag`` / ``--no-flag``
    (:class:`argparse.BooleanOptionalAction`), ``tuple`` / ``list`` -> ``nargs="+"`` of the
    item type, ``X | None`` -> ``X``, ``Literal[...]`` -> those choices. The default is the
    field's (or ``defaults[name]``), the help text ``field.metadata["help"]`` (else the field
    name). The parsed value lands under the field's name (``args.max_steps_per_epoch``).
    Fields in ``exclude`` get no option; a field of another type (a mapping, a nested
    dataclass) must be excluded (TypeError otherwise).
    """
    _check_dataclass(cls)
    defaults = dict(defaults or {})
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    stray = sorted((set(exclude) | set(defaults)) - known)
    if stray:
        raise ValueError(f"{cls.__name__} has no fields {', '.join(stray)} (in exclude or defaults)")
    for field in dataclasses.fields(cls):
        if not field.init or field.name in exclude:
            continue
        default = defaults.get(field.name, _default(field))
        options: dict[str, Any] = {"dest": field.name, "help": field.metadata.get("help", field.name)}
        if default is not dataclasses.MISSING:
            options["default"] = list(default) if isinstance(default, tuple) else default
        else:
            options["required"] = True
        hint, _ = _strip_optional(hints[field.name])
        origin = typing.get_origin(hint)
        if hint is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            choices = typing.get_args(hint)
            options.update(type=type(choices[0]), choices=choices)
        elif hint in (int, float, str):
            options["type"] = hint
        elif origin in (tuple, list) or hint in (tuple, list):
            items = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
            item = items[0] if items else str
            if item not in (int, float, str) or len(set(items)) > 1:
                raise TypeError(f"{cls.__name__}.{field.name}: cannot make an option for {hint}; exclude it")
            options.update(type=item, nargs="+")
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: cannot make an option for {hint}; exclude it")
        if "choices" in field.metadata:
            options["choices"] = tuple(field.metadata["choices"])
        flags = [option_name(field.name), *field.metadata.get("aliases", ())]
        parser.add_argument(*flags, **options)


def from_arguments(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """An instance of ``cls`` from parsed options (:func:`add_arguments`) plus ``overrides``.

    Every field with an attribute of the same name in ``args`` takes it; ``overrides`` win
    (for fields that were excluded from the parser or need converting). Values are shaped
    as in :func:`from_mapping`.
    """
    _check_dataclass(cls)
    parsed = vars(args)
    values = {f.name: parsed[f.name] for f in dataclasses.fields(cls) if f.init and f.name in parsed}
    values.update(overrides)
    return from_mapping(cls, values)
