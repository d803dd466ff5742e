"""Where data and decoded caches live: option > environment variable > user cache directory."""

from __future__ import annotations

import os
from pathlib import Path


def _user_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kernelfit"


def _resolve_with_origin(data_dir=None) -> tuple[Path, str]:
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), "from the data_dir option / --data-dir"
    env = os.environ.get("KERNELFIT_DATA")
    if env:
        return Path(env).expanduser(), "from $KERNELFIT_DATA"
    if os.environ.get("XDG_CACHE_HOME"):
        return _user_cache_root(), "default: $XDG_CACHE_HOME/kernelfit"
    return _user_cache_root(), "default: ~/.cache/kernelfit"


def resolve_data_dir(data_dir=None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$KERNELFIT_DATA``, else
    ``$XDG_CACHE_HOME/kernelfit`` (``~/.cache/kernelfit`` when XDG_CACHE_HOME is unset).

    Nothing is created or checked here.
    """
    return _resolve_with_origin(data_dir)[0]
