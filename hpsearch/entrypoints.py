"""The user's own code: ``"package.module:function"`` entry points for a model or a data set.

A job names a factory (``model.factory``, ``data.factory``); this module finds it, imports it and
calls it, and turns whatever goes wrong into one :class:`~hpsearch.errors.EntryPointError` that
names the job's field and shows the user's own traceback (their frames, not ours).

Where code is found: the folders of the job's ``code`` list (the job file's folder first, then
any the job names), then the working directory and the installed packages. :func:`locate`
answers without running any of the user's code (``hpsearch validate`` stays instant and imports no
torch); :func:`load` imports. :func:`shipped_modules` is what travels to a cluster's nodes.

Imports nothing heavy, nothing of hpsearch but its errors.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import re
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

from hpsearch.errors import EntryPointError

REFERENCE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
REFERENCE_RULE = "'module:function' (a module on the import path and a callable in it, e.g. my_models:build)"
_OURS = str(Path(__file__).resolve().parent)


def is_reference(text: Any) -> bool:
    return isinstance(text, str) and bool(REFERENCE_RE.match(text))


def split(reference: str) -> tuple[str, str]:
    module, _, attr = reference.partition(":")
    return module, attr


def on_path(folders: Iterable[str]) -> None:
    """Put the job's code folders on this process's import path (after what is there: a copy Ray
    shipped to this node, already on the path, comes first)."""
    for folder in folders:
        if folder not in sys.path:
            sys.path.append(folder)


def locate(reference: str, folders: Iterable[str]) -> str | None:
    """Where ``reference``'s module is (a file or a package folder), without importing it or its
    packages; None if it cannot be found in ``folders``, the working directory or the installed
    packages."""
    module, _ = split(reference)
    search = [*folders, os.getcwd(), *sys.path]
    spec = None
    for part in module.split("."):
        spec = importlib.machinery.PathFinder.find_spec(part, search)
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return str(list(spec.submodule_search_locations)[0])
    return spec.origin


def check_findable(field: str, reference: str, folders: Iterable[str]) -> str | None:
    """The problem with a factory reference that ``hpsearch validate`` can see, or None."""
    folders = list(folders)
    if locate(reference, folders) is None:
        module, _ = split(reference)
        where = ", ".join([*folders, os.getcwd()])
        return (f"no module named {module!r} in {where} or the installed packages; put {module.replace('.', '/')}.py "
                "beside the job file, or name its folder in the job's code list")
    return None


def load(field: str, reference: str, folders: Iterable[str]) -> Callable[..., Any]:
    """Import ``reference`` and return its callable. Raises :class:`EntryPointError`."""
    on_path(folders)
    module_name, attr = split(reference)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise EntryPointError(f"{field}: {reference}: no module named {e.name!r} on the import path "
                                  f"({', '.join(folders)}, the working directory, the installed packages)") from None
        raise EntryPointError(f"{field}: {reference}: importing {module_name} failed: {_last_line(e)}",
                              user_traceback(e)) from None
    except Exception as e:
        raise EntryPointError(f"{field}: {reference}: importing {module_name} failed: {_last_line(e)}",
                              user_traceback(e)) from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise EntryPointError(f"{field}: {reference}: {module_name} has no {attr!r}"
                                  + (f" (its callables: {', '.join(names)})" if names else ""))
        target = getattr(target, part)
    if not callable(target):
        raise EntryPointError(f"{field}: {reference}: is a {type(target).__name__}, not a function or class "
                              "hpsearch can call")
    return target


def call(field: str, reference: str, fn: Callable[..., Any], *args: Any,
         hint: Callable[[Exception], str | None] = lambda e: None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, an error of the user's code raised as :class:`EntryPointError`
    (``hint(error)``, if it says something, added to the message)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        more = hint(e)
        raise EntryPointError(f"{field}: {reference} raised {type(e).__name__}: {_last_line(e)}"
                              + (f"; {more}" if more else ""), user_traceback(e)) from None


def user_traceback(error: BaseException) -> str:
    """The traceback of ``error`` without hpsearch's own frames (and the libraries' above them)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(_OURS)]
    lines = traceback.format_list(frames) + traceback.format_exception_only(type(error), error)
    return "Traceback (your code):\n" + "".join(lines).rstrip()


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


# --------------------------------------------------------------------------------------------
# What travels to a cluster's nodes.
# --------------------------------------------------------------------------------------------

_INSTALLED = {sysconfig.get_paths()[key] for key in ("purelib", "platlib", "stdlib")}
_NEVER_SHIPPED = {"hpsearch", "tests", "setup", "conftest"}


def shipped_modules(references: Iterable[str], folders: Iterable[str]) -> list[str]:
    """The modules and packages (paths) that carry the factories' code to other nodes: every
    top-level module and package of each folder a factory's module was found in (so helpers it
    imports from beside it come too); nothing for a factory found among the installed packages."""
    out: list[str] = []
    folders = list(folders)
    for reference in references:
        top = split(reference)[0].split(".")[0]
        where = locate(f"{top}:x", folders)
        if where is None:
            continue
        home = Path(where).parent
        if any(str(home).startswith(p) for p in _INSTALLED):
            continue
        for entry in sorted(home.iterdir()):
            if entry.name.startswith((".", "_")) or entry.stem in _NEVER_SHIPPED:
                continue
            is_module = entry.is_file() and entry.suffix == ".py"
            is_package = entry.is_dir() and (entry / "__init__.py").is_file()
            if (is_module or is_package) and str(entry) not in out:
                out.append(str(entry))
    return out
