"""Optional dependencies, named once at the top of the module that uses them and imported on first use.

The pattern of Polygraphy's `mod.lazy_import` and MONAI's `optional_import`: a module that needs
TensorRT, torch-tensorrt or SimpleITK on one path still loads where they are missing (a CPU CI
machine, a GPU image without SimpleITK), and the path that needs one fails with the install hint
instead of a bare ModuleNotFoundError.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class MissingDependency(ImportError):
    """An optional dependency is not installed (or does not import): the message names the fix."""


class LazyModule:
    """Stands in for a module until an attribute is read; then imports it once."""

    def __init__(self, name: str, install: str) -> None:
        self._name, self._install = name, install
        self._module: ModuleType | None = None

    def load(self) -> ModuleType:
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ImportError as e:
                raise MissingDependency(f"{self._name} is not installed ({e}): {self._install}") from None
        return self._module

    def missing_reason(self) -> str | None:
        """None when the module imports; otherwise one line saying why not and how to fix it.

        Placeholder wheels and missing CUDA libraries fail with errors other than ImportError."""
        try:
            self.load()
        except Exception as e:
            text = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if isinstance(e, MissingDependency):
                return text
            return f"{self._name} failed to import ({type(e).__name__}: {text}): {self._install}"
        return None

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.load(), attr)


def lazy_import(name: str, install: str) -> Any:
    """`trt = lazy_import("tensorrt", "pip install 'm2anet[gpu]'")` at module top."""
    return LazyModule(name, install)
