"""Package attributes imported on first use (PEP 562), so a family package's presets and checkpoint code
load without torch while `from models.<family> import <Network>` still works."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, lazy: Mapping[str, str], public: Sequence[str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: a name in `lazy` (name -> defining module) is imported when
    first read and then kept as a plain attribute; other unknown names raise AttributeError listing `public`."""

    def __getattr__(name: str) -> Any:
        if name in lazy:
            value = getattr(importlib.import_module(lazy[name]), name)
            setattr(sys.modules[package], name, value)  # later reads are plain attribute lookups
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}; public names: {', '.join(public)}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(public))

    return __getattr__, __dir__
