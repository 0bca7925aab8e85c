"""The base of every settings dataclass: JSON-ready ``to_dict`` and a strict ``from_dict``."""

from __future__ import annotations

import dataclasses
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
