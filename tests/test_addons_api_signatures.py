"""Every in-scope popxl-addons name that gptj_popxl.addons exports has popxl-addons' exact signature.

The reference (shared/reference/popxl_addons_api.json) lists popxl-addons' functions, classes,
methods and properties by defining module (``popxl_addons.<module>[.<file>].<name>``). A name counts
as exported when it resolves under ``gptj_popxl.addons`` at that path or with one or two of its
module segments left out (``ops.cross_entropy.cross_entropy`` -> ``ops.cross_entropy``). Names not
exported are printed by ``test_report_addons_names_not_exported`` (``pytest -s``), not failures.
"""
import importlib
import inspect
import types

import pytest
from test_api_signatures import _same_default, check_signature, load_reference, reference_file

from gptj_popxl import addons, popxl_cpu

REFERENCE = reference_file("popxl_addons_api.json")
OUT_OF_SCOPE = ("popxl_addons.layers.conv", "popxl_addons.layers.group_norm", "popxl_addons.layers.linear_fp8",
                "popxl_addons.ops.fp8_", "popxl_addons.ops.static_sparse_ops", "popxl_addons.transforms.pipelining",
                "popxl_addons.transforms.use_fc_pass", "popxl_addons.testing_utils", "popxl_addons.performance_utils")

API = load_reference(REFERENCE, OUT_OF_SCOPE)


def candidate_paths(key: str):
    """The dotted paths (after ``popxl_addons``) to try for ``key``: as given, then without one, then
    two, of its module segments (never the last name, nor a class of a member)."""
    parts = key.split(".")[1:]
    inner = range(len(parts) - 1)
    paths = [parts]
    paths += [parts[:i] + parts[i + 1:] for i in inner]
    paths += [parts[:i] + parts[i + 2:] for i in range(len(parts) - 2)]
    return paths


def _child(obj, name):
    if isinstance(obj, type):
        return inspect.getattr_static(obj, name)
    if isinstance(obj, types.ModuleType):
        # A submodule first: a package may export a function under its module's name.
        try:
            return importlib.import_module(f"{obj.__name__}.{name}")
        except ModuleNotFoundError:
            return getattr(obj, name)
    return getattr(obj, name)


def resolve(path):
    obj = addons
    for name in path:
        try:
            obj = _child(obj, name)
        except (AttributeError, ImportError):
            return None
    return obj


def find(key: str):
    """The object exported for ``key``, or None. A class member must belong to a class found for the class."""
    for path in candidate_paths(key):
        found = resolve(path)
        if found is not None and not isinstance(found, types.ModuleType):
            return found
    return None


def _same_addons_default(ref_text: str, ours) -> bool:
    if ref_text.startswith("popxl."):
        return getattr(popxl_cpu, ref_text[len("popxl."):], object()) is ours
    return _same_default(ref_text, ours)


EXPORTED = sorted(key for key in API if find(key) is not None)
MISSING = sorted(key for key in API if key not in EXPORTED)


@pytest.mark.skipif(not API, reason=f"reference API list {REFERENCE} is missing")
@pytest.mark.parametrize("key", EXPORTED)
def test_signature_matches_popxl_addons(key):
    check_signature(key, API[key], find(key), _same_addons_default)


@pytest.mark.skipif(not API, reason=f"reference API list {REFERENCE} is missing")
def test_report_addons_names_not_exported():
    """Prints the in-scope popxl-addons names we lack (run with ``-s`` to see them)."""
    print(f"\n{len(MISSING)} of {len(API)} in-scope popxl-addons names are not exported by gptj_popxl.addons:")
    for key in MISSING:
        print("  " + key)
    for key in ("popxl_addons.task_session.TaskSession.run", "popxl_addons.module.Module.create_grad_graph",
                "popxl_addons.ops.streams.host_load", "popxl_addons.patterns.apply_pre_alias_patterns"):
        assert key in EXPORTED


def test_candidate_paths():
    paths = candidate_paths("popxl_addons.ops.cross_entropy_sharded_loss.cross_entropy_sharded_loss.f")
    assert ["ops", "cross_entropy_sharded_loss", "f"] in paths and ["ops", "f"] in paths
    assert find("popxl_addons.ops.cross_entropy.cross_entropy") is addons.ops.cross_entropy
    assert find("popxl_addons.task_session.TaskSession") is addons.TaskSession
    assert _same_addons_default("popxl.float32", popxl_cpu.float32)
    assert not _same_addons_default("popxl.float32", popxl_cpu.float16)
