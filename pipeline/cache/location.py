"""Where a cache lives: a local folder, or any fsspec URL (``s3://bucket/prefix``, ``gs://``, ``memory://``).

Local caches stay plain :class:`pathlib.Path` objects, so their fast paths (atomic renames, memory-mapped
chunks) are untouched; a URL becomes a :class:`upath.UPath`, the pathlib API over fsspec. Connection settings
come from fsspec's usual places: for S3, the AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an S3-compatible server) or ``FSSPEC_S3_*`` variables.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from upath import UPath

from pipeline.errors import ConfigError

#: A cache location: a local folder or an fsspec URL.
Location = Path | UPath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: object) -> bool:
    """Whether ``path`` names a remote location (``file://`` and plain paths are local)."""
    if isinstance(path, Path):
        return False
    if isinstance(path, UPath):
        return True
    text = str(path)
    return bool(_URL.match(text)) and not text.startswith("file://")


def as_location(path: str | os.PathLike[str] | UPath) -> Location:
    """A :class:`Path` for a local folder (``file://`` URLs included), a :class:`UPath` for a remote URL."""
    if isinstance(path, (Path, UPath)):
        return path
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return UPath(text) if is_url(text) else Path(text)


def is_local(path: Location) -> bool:
    return isinstance(path, Path)


def fs_path(path: Location) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) of a remote location."""
    if not isinstance(path, UPath):
        raise TypeError(f"{path} is local")
    return path.fs, path.path


def check_reachable(path: Location) -> None:
    """Fail early, with one clear line, when a remote location cannot be used.

    Args:
        path: a cache root or cache directory; local paths are not checked here.

    Raises:
        ConfigError: the bucket (or container) is missing, access is denied (credentials), or the
            store cannot be reached.
    """
    if is_local(path):
        return
    fs, inner = fs_path(path)
    bucket = inner.split("/", 1)[0]
    url = f"{str(path).split('://', 1)[0]}://{bucket}"
    try:
        fs.ls(bucket, detail=False, refresh=True)  # unlike exists(), raises what went wrong
    except PermissionError as exc:
        raise ConfigError(f"access to {url} denied: {_first_line(exc)} (check the credentials, e.g. "
                          "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)") from None
    except FileNotFoundError:
        raise ConfigError(f"{url} does not exist (create the bucket first; the cache never creates one)") from None
    except Exception as exc:  # botocore/aiohttp errors are not OSErrors; each is one line to the user
        if "Credentials" in type(exc).__name__:  # botocore's NoCredentialsError, PartialCredentialsError
            raise ConfigError(f"no usable credentials for {url}: {_first_line(exc)} (set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, or a profile)") from None
        raise ConfigError(f"cannot reach {url}: {type(exc).__name__}: {_first_line(exc)} (for an S3-compatible "
                          "server set AWS_ENDPOINT_URL)") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: scheme, then anything up to the token's last "@" (a secret may hold "/" and "+"), the rest, a query or fragment
_CREDENTIALS = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)(?:[^\s'\"]*@)?([^\s?#'\"]*)(?:[?#][^\s'\"]*)?")


def redact(text: str) -> str:
    """``text`` with every URL's user, password, query string and fragment removed (``s3://KEY:SECRET@b/p?x``
    becomes ``s3://b/p``): what may be printed or stored of a location. Credentials belong in the
    environment (see the module's docstring), never in a URL."""
    return _CREDENTIALS.sub(r"\1\2", text)


def redact_tree(value: Any) -> Any:
    """:func:`redact` applied to every string in nested dicts, lists and tuples (keys included)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_tree(k): redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return value
