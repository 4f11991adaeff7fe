"""Run a Python subprocess as if some installed packages were absent (a bare GPU machine, a minimal install)."""
from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = '''
import importlib.abc, sys

HIDDEN = {hidden!r}


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in HIDDEN):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _Hide())
'''


def hiding_env(folder: Path, hidden: list[str], repo: Path | None = None) -> dict:
    """os.environ plus a PYTHONPATH whose sitecustomize makes `hidden` (modules and their submodules) unimportable;
    `repo` goes on the path too, as on a machine where advtrain is a plain checkout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=sorted(hidden)))
    path = [str(folder), *([str(repo)] if repo else []), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
