"""Runs programs written for the Poplar SDK's popxl on this CPU runtime, unmodified.

    python -m gptj_popxl.popxl_cpu script.py [args]      # like `python script.py [args]`
    python -m gptj_popxl.popxl_cpu -m module [args]      # like `python -m module [args]`

When the SDK's ``popxl`` cannot be imported, ``popxl`` and each of its submodules (``popxl.ops``,
``popxl.ops.collectives``, ``popxl.transforms``, ...) import as the matching module of
``gptj_popxl.popxl_cpu`` (and ``popxl_addons`` as ``gptj_popxl.addons`` where that exists), so
``import popxl`` and ``from popxl.ops import collectives`` find this runtime. When the SDK is
importable the program runs with it, untouched.
"""
import importlib
import importlib.abc
import importlib.util
import os
import runpy
import sys
from typing import List

USAGE = """usage: python -m gptj_popxl.popxl_cpu script.py [args ...]
       python -m gptj_popxl.popxl_cpu -m module [args ...]

Runs a program written for the Poplar SDK's popxl on the CPU runtime gptj_popxl.popxl_cpu
(the SDK's popxl is used instead when it is importable)."""

# public name -> the package standing in for it
STAND_INS = {"popxl": "gptj_popxl.popxl_cpu", "popxl_addons": "gptj_popxl.addons"}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``public[.sub]`` as the module ``stand_in[.sub]`` (the same module object, imported on
    first use, so a stand-in package that is broken or unused costs nothing until imported)."""

    def __init__(self, public: str, stand_in: str):
        self.public, self.stand_in = public, stand_in

    def _target(self, fullname: str) -> str:
        return self.stand_in + fullname[len(self.public):]

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.public and not fullname.startswith(self.public + "."):
            return None
        if not _importable(self._target(fullname)):
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(self._target(spec.name))
        # Submodules the stand-in has already imported get their public names now. Importing one later
        # under its public name would otherwise rebind the parent package's attribute of that name to the
        # submodule (Python does so for every freshly loaded submodule), hiding a function of the same
        # name, such as ``popxl.transforms.autodiff``; popxl's own packages import them up front.
        prefix = self.stand_in + "."
        for name, sub in list(sys.modules.items()):
            if name.startswith(prefix) and sub is not None:
                sys.modules.setdefault(self.public + name[len(self.stand_in):], sub)
        return module

    def exec_module(self, module):
        pass  # the stand-in module ran when create_module imported it


def install_aliases() -> List[str]:
    """Makes ``popxl`` (and ``popxl_addons``) and their submodules import this runtime's modules.

    Does nothing when the SDK's popxl is importable. Returns the public names aliased.
    """
    if "popxl" in sys.modules or _importable("popxl"):
        return []
    installed = []
    for public, stand_in in STAND_INS.items():
        if public not in sys.modules and not _importable(public) and _importable(stand_in):
            sys.meta_path.insert(0, _Alias(public, stand_in))
            installed.append(public)
    return installed


def main(argv: List[str]) -> None:
    """Runs ``argv`` (``script [args]`` or ``-m module [args]``) as ``python`` would run it."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(2 if not argv else 0)
    if argv[0] == "-m":
        if len(argv) < 2:
            print(USAGE, file=sys.stderr)
            raise SystemExit(2)
        install_aliases()
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    if argv[0].startswith("-"):
        print(f"unknown option {argv[0]!r}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    script = argv[0]
    if not os.path.exists(script):
        print(f"python -m gptj_popxl.popxl_cpu: can't open file {script!r}: no such file", file=sys.stderr)
        raise SystemExit(2)
    install_aliases()
    sys.argv = list(argv)
    # As `python script.py`: the script's directory comes first on the import path.
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
