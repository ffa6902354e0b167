"""Package attributes imported on first use, so importing a package (or a CLI's --help) stays cheap; and
one clear ImportError for a module path or name that moved."""

import importlib
import importlib.abc
import sys
from typing import Callable, Dict, List, Mapping, Optional, Tuple


def lazy_exports(package: str, exports: Dict[str, str], moved: Optional[Mapping[str, str]] = None
                 ) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, importing ``name`` from submodule ``exports[name]`` when
    asked; a name in ``moved`` raises an ImportError naming where it is now."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(f".{exports[name]}", package), name)
        if moved and name in moved:
            raise ImportError(f"{package}.{name} moved: import it from {moved[name]}", name=package)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(exports)

    return __getattr__, __dir__


class MovedModules(importlib.abc.MetaPathFinder):
    """Importing a module path of ``moved`` (old name -> new name) raises an ImportError that names the new one."""

    def __init__(self, moved: Mapping[str, str]):
        self.moved = dict(moved)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.moved:
            raise ImportError(f"{fullname} moved to {self.moved[fullname]} (see CHANGELOG.md)", name=fullname)
        return None


def report_moved_modules(moved: Mapping[str, str]) -> None:
    """Make importing any old module path of ``moved`` fail with one line naming its new place."""
    sys.meta_path.append(MovedModules(moved))
