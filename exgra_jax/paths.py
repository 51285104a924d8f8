"""The one path layer for everything a run reads or writes: local paths and URLs (gs://...)
behave the same, through ``etils.epath`` (which orbax uses too).

Local paths are made absolute, so a saved config works from any directory; URLs pass
through unchanged.
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_url(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """``path`` made absolute when it is local ('' stays '')."""
    if not path or is_url(path):
        return str(path)
    return os.path.abspath(os.path.expanduser(str(path)))


def join(base: str, *parts: str) -> str:
    return str(epath.Path(base).joinpath(*parts))


def basename(path: str) -> str:
    return epath.Path(str(path).rstrip("/")).name


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def is_dir(path: str) -> bool:
    return epath.Path(path).is_dir()


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
    return epath.Path(path).read_text()


def write_text(path: str, text: str) -> None:
    """Whole-file write: a crash never leaves half a file. Locally through a temporary
    sibling; a URL directly, since an object store publishes an object only once its upload
    completes (and a "rename" there is a copy and a delete)."""
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_url(path):
        target.write_text(text)
        return
    tmp = target.parent / f".{target.name}.tmp"
    tmp.write_text(text)
    tmp.replace(target)


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


def write_json(path: str, value: Any, **kwargs) -> None:
    write_text(path, json.dumps(value, **kwargs))
