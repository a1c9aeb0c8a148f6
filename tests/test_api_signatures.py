"""Every popxl name that popxl_cpu exports has popxl's exact signature.

The reference (shared/reference/popxl_api.json) lists popxl 3.x's functions, classes, methods and
properties by the file they are defined in; see shared/reference/README.md for how those map to
public names. Names popxl_cpu does not export are listed by ``test_report_names_not_exported``
(``pytest -s``), not failures.
"""
import ast
import inspect
import json
import math
import types
from pathlib import Path

import pytest

from gptj_popxl import popxl_cpu


def reference_file(name: str) -> Path:
    """``shared/reference/<name>`` in the repository's sibling ``shared/``, looked up through the
    parents so that worktrees find it too (where none has it: the repository's sibling)."""
    paths = [d / "shared" / "reference" / name for d in Path(__file__).resolve().parents]
    return next((p for p in paths if p.exists()), paths[2])


def load_reference(path: Path, out_of_scope=()) -> dict:
    """The reference API list at ``path`` less keys starting with one of ``out_of_scope``; {} if missing."""
    if not path.exists():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith(tuple(out_of_scope))}


REFERENCE = reference_file("popxl_api.json")
SUBPACKAGES = ("popxl.ops.collectives.", "popxl.ops.var_updates.")
FLATTENED = ("popxl.ops.", "popxl.transforms.")


API = load_reference(REFERENCE)


def candidate_paths(key: str):
    """Public dotted paths under which popxl exposes reference ``key``, then its defining-file path."""
    parts = key.split(".")
    paths = []
    for prefix in SUBPACKAGES + FLATTENED:
        if key.startswith(prefix):
            depth = prefix.count(".")
            paths.append(parts[:depth] + parts[depth + 1:])  # drop the file name
            break
    else:
        paths.append(parts[:1] + parts[2:])  # popxl.<file>.<name> -> popxl.<name>
    paths.append(parts)
    return paths


def resolve(path):
    """``(owner, name, object)`` for a dotted path inside popxl_cpu, class members fetched statically."""
    obj, owner = popxl_cpu, None
    for name in path[1:]:
        owner = obj
        try:
            obj = inspect.getattr_static(obj, name) if isinstance(obj, type) else getattr(obj, name)
        except AttributeError:
            return None
    return owner, path[-1], obj


def find(key: str):
    for path in candidate_paths(key):
        found = resolve(path)
        if found is not None and not isinstance(found[2], types.ModuleType):
            return found
    return None


def _describe_param(p: inspect.Parameter) -> dict:
    name = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
    default = None if p.default is p.empty else p.default
    return {"name": name, "default": default, "has_default": p.default is not p.empty,
            "kwonly": p.kind is p.KEYWORD_ONLY}


def _ref_default(text: str):
    """The value of a default written as source text in the reference."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return eval(text, {"__builtins__": {}}, {"float": float, "dtypes": popxl_cpu.dtypes})  # noqa: S307


def _same_default(ref_text: str, ours) -> bool:
    try:
        expected = _ref_default(ref_text)
    except Exception:  # noqa: BLE001 - a default naming something popxl_cpu lacks: compare the text
        return " ".join(ref_text.split()) == repr(ours)
    if isinstance(expected, float) and isinstance(ours, float) and math.isnan(expected):
        return math.isnan(ours)
    return type(expected) is type(ours) and expected == ours


def signature_problems(ref: dict, ours, same_default=_same_default) -> list:
    """How ``ours`` differs from the reference parameter list (empty when identical);
    ``same_default(reference text, our default)`` compares defaults."""
    params = [_describe_param(p) for p in inspect.signature(ours).parameters.values()]
    ref_params = ref["params"]
    names = [p["name"] for p in params]
    ref_names = [p["name"] for p in ref_params]
    if names != ref_names:
        return [f"parameters {names} != reference {ref_names}"]
    problems = []
    for p, r in zip(params, ref_params):
        if r["default"] is None and p["has_default"]:
            problems.append(f"'{p['name']}' has default {p['default']!r}; the reference has none")
        elif r["default"] is not None and not p["has_default"]:
            problems.append(f"'{p['name']}' lacks the reference default {r['default']}")
        elif r["default"] is not None and not same_default(r["default"], p["default"]):
            problems.append(f"'{p['name']}' default {p['default']!r} != reference {r['default']}")
        if p["kwonly"] != bool(r.get("kwonly")):
            problems.append(f"'{p['name']}' keyword-only is {p['kwonly']}, reference {bool(r.get('kwonly'))}")
    return problems


def callable_of(ref: dict, obj):
    """The function whose signature stands for ``obj`` given the reference kind (None if of the wrong kind)."""
    kind = ref["kind"]
    if isinstance(obj, property):
        if kind == "property":
            return obj.fget
        # A property with a setter is listed by popxl as a method (self, value): the setter.
        return obj.fset if kind == "method" else None
    if kind == "property":
        return None
    if isinstance(obj, (classmethod, staticmethod)):
        return obj.__func__
    if kind == "class":
        return obj if isinstance(obj, type) else None
    return obj if callable(obj) and not isinstance(obj, type) else None


def check_signature(key: str, ref: dict, obj, same_default=_same_default) -> None:
    """Asserts that ``obj``, exported for reference ``key``, is of its kind with its exact signature."""
    fn = callable_of(ref, obj)
    assert fn is not None, f"{key}: the reference has a {ref['kind']}, ours is {type(obj).__name__} {obj!r}"
    if ref["kind"] != "class":
        problems = signature_problems(ref, fn, same_default)
        assert not problems, f"{key}: " + "; ".join(problems)


EXPORTED = sorted(key for key in API if find(key) is not None)
MISSING = sorted(key for key in API if key not in EXPORTED)


@pytest.mark.skipif(not API, reason=f"reference API list {REFERENCE} is missing")
@pytest.mark.parametrize("key", EXPORTED)
def test_signature_matches_popxl(key):
    check_signature(key, API[key], find(key)[2])


@pytest.mark.skipif(not API, reason=f"reference API list {REFERENCE} is missing")
def test_report_names_not_exported():
    """Prints the reference names popxl_cpu lacks (run with ``-s`` to see them)."""
    print(f"\n{len(MISSING)} of {len(API)} popxl reference names are not exported by popxl_cpu:")
    for key in MISSING:
        print("  " + key)
    # The core of the API must be there whatever else is missing.
    for key in ("popxl.ir.Ir.create_graph", "popxl.ops.call.call", "popxl.transforms.autodiff.autodiff",
                "popxl.session.Session.run", "popxl.tensor.variable"):
        assert key in EXPORTED


def test_mapping_rules():
    assert candidate_paths("popxl.ops.matmul.matmul")[0] == ["popxl", "ops", "matmul"]
    assert candidate_paths("popxl.ops.collectives.all_reduce.all_reduce")[0] == [
        "popxl", "ops", "collectives", "all_reduce"]
    assert candidate_paths("popxl.ops.call.CallSiteInfo.inputs")[0] == ["popxl", "ops", "CallSiteInfo", "inputs"]
    assert candidate_paths("popxl.transforms.autodiff.GradGraphInfo.graph")[0] == [
        "popxl", "transforms", "GradGraphInfo", "graph"]
    assert candidate_paths("popxl.tensor.Tensor.reshape")[0] == ["popxl", "Tensor", "reshape"]
    assert _same_default("float('-inf')", float("-inf")) and not _same_default("1", True)
    assert _same_default("dtypes.float32", popxl_cpu.float32) and _same_default("1e-05", 1e-5)
