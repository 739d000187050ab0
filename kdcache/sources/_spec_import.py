"""Import ``path/to/file.py:attr`` spec files under names that any process can resolve.

A spec file is imported as the module ``kdcache._kdcache_spec_<hash of its path>``, and the
objects it defines pickle under that name. A process that unpickles them (a DataLoader worker
started with ``spawn``, macOS's default) must be able to import that name again, so:

* every spec file imported records ``name → path`` in the environment variable
  ``KDCACHE_SPEC_FILES`` (JSON), which child processes inherit;
* :class:`SpecFileFinder`, on ``sys.meta_path`` as soon as this module is imported (kdcache's
  ``__init__`` imports it), resolves those names from that variable.

The names sit under the ``kdcache`` package on purpose: importing one imports ``kdcache`` first,
which installs the finder, even when the user's object is the first thing a worker unpickles.

This module imports nothing heavy (no torch): it only maps names to files.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from types import ModuleType

ENV_VAR = "KDCACHE_SPEC_FILES"
PREFIX = "kdcache._kdcache_spec_"


def module_name(path: str) -> str:
    """The stable module name of the spec file at absolute ``path``: one module per file."""
    return PREFIX + hashlib.sha1(path.encode()).hexdigest()[:12]


def import_file(path: str) -> ModuleType:
    """Import the Python file at absolute ``path`` (once per process) under :func:`module_name`.

    Whatever the file raises while running propagates; the import system then forgets the module.
    """
    name = module_name(path)
    _register(name, path)
    return importlib.import_module(name)


def registered() -> dict[str, str]:
    """``name → path`` of the spec files this process and its parents imported."""
    try:
        table = json.loads(os.environ.get(ENV_VAR, "{}"))
    except ValueError:
        return {}
    return table if isinstance(table, dict) else {}


def _register(name: str, path: str) -> None:
    table = registered()
    if table.get(name) != path:
        os.environ[ENV_VAR] = json.dumps({**table, name: path}, sort_keys=True)


class SpecFileFinder(importlib.abc.MetaPathFinder):
    """Finds ``kdcache._kdcache_spec_*`` modules in the files :data:`ENV_VAR` names."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(PREFIX):
            return None
        file = registered().get(fullname)
        if file is None:
            return None
        return importlib.util.spec_from_file_location(fullname, file, loader=_SpecFileLoader(fullname, file))


class _SpecFileLoader(importlib.machinery.SourceFileLoader):
    """Runs a spec file with its own folder first on ``sys.path``, so it can import its neighbours."""

    def exec_module(self, module: ModuleType) -> None:
        folder = os.path.dirname(self.path)
        sys.path.insert(0, folder)
        try:
            super().exec_module(module)
        finally:
            sys.path.remove(folder)


def install() -> None:
    """Put :class:`SpecFileFinder` on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, SpecFileFinder) for f in sys.meta_path):
        sys.meta_path.append(SpecFileFinder())


install()
