"""The base of every settings dataclass (JSON-ready ``to_dict``, a strict ``from_dict``), and the one way a
command line is built from one: :func:`setting` fields carry their help and choices, :func:`add_settings`
turns them into flags, :func:`settings_from_args` back into settings."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

from pipeline.errors import ConfigError

C = TypeVar("C", bound="Config")


class Config:
    """Mixin for ``@dataclass(frozen=True)`` settings validated in ``__post_init__``.

    ``to_dict()`` goes into manifests, run directories and checkpoints;
    ``from_dict()`` rebuilds the object and rejects keys it does not know
    (missing keys take their defaults).
    """

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field; tuples become lists, so it equals its JSON round trip."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: an unknown key, or an invalid value (from ``__post_init__``).
        """
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} settings {unknown}")
        return cls(**data)


def setting(default: Any, help: str, *, choices: Sequence[Any] | None = None, flag: str | None = None,
            metavar: str | tuple[str, ...] | None = None, zero_is_none: bool = False, switch: bool = True) -> Any:
    """A settings field carrying what its command-line flag needs, so every CLI is built from the fields.

    Args:
        default: the field's default.
        help: the flag's help text.
        choices: the allowed values (the list owned by the module that defines them).
        flag: the flag, when not ``--`` + the field name with dashes.
        metavar: argparse's metavar.
        zero_is_none: ``0`` on the command line stands for ``None`` (for example "keep all").
        switch: a ``bool`` field is a ``--x`` / ``--no-x`` switch; False: it takes ``true`` or ``false``.
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag,
                                                        "metavar": metavar, "zero_is_none": zero_is_none,
                                                        "switch": switch})


def _true_false(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def add_settings(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type[Config],
                 skip: Collection[str] = ()) -> None:
    """One flag per field of the settings dataclass ``cls`` (but ``skip``), from its :func:`setting` metadata.

    The type comes from the annotation: ``int``, ``float`` and ``str`` (``int | str`` reads a string);
    ``tuple[int, int, int]`` takes three numbers, ``tuple[float, ...]`` one or more; ``bool`` is a ``--x`` / ``--no-x`` switch; ``bool | None``
    takes true or false (None keeps the meaning its help gives). A field without a default is required.
    ``dest`` is always the field's name, so :func:`settings_from_args` finds it.
    """
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in skip:
            continue
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" ", "")
        common: dict[str, Any] = {"dest": f.name, "help": meta.get("help", f.name.replace("_", " "))}
        if meta.get("metavar"):
            common["metavar"] = meta["metavar"]
        if f.default is dataclasses.MISSING:
            common.update(required=True, default=argparse.SUPPRESS)
        else:
            common["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
        if kind.startswith("tuple[int"):
            parser.add_argument(flag, type=int, nargs=3, **{"metavar": ("X", "Y", "Z"), **common})
        elif kind.startswith("tuple[float"):
            parser.add_argument(flag, type=float, nargs="+", **common)
        elif kind == "bool" and meta.get("switch", True):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind in ("bool", "bool|None"):
            parser.add_argument(flag, type=_true_false, **{"metavar": "{true,false}", **common})
        else:
            reader = str if "str" in kind else _TYPES.get(kind.split("|")[0], str)
            choices = meta.get("choices")
            parser.add_argument(flag, type=reader, choices=list(choices) if choices else None, **common)


def settings_from_args(cls: type[C], args: argparse.Namespace, **given: Any) -> C:
    """The ``cls`` the flags of :func:`add_settings` describe (``given`` for the fields it skipped)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in given or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.metadata.get("zero_is_none") and value == 0:
            value = None
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values, **given)
