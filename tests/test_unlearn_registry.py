"""The unlearning-method registry (guardserve.unlearn.methods): one file per method, each
registered in METHODS, each buildable by name and each trained by
tests/test_unlearn_methods.py. Fast: nothing is trained and no model is loaded."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import guardserve.unlearn.methods as methods_pkg
from guardserve.unlearn import METHODS as REEXPORTED
from guardserve.unlearn import Method as ReexportedMethod
from guardserve.unlearn import get_method as reexported_get_method
from guardserve.unlearn.methods import METHODS, Method, get_method

TRAINING_TEST = Path(__file__).with_name("test_unlearn_methods.py")
# Modules of the package that hold no registered method.
NOT_METHODS = {"base", "common"}


def _trained_names() -> set[str]:
    """Method names in the ``name`` argument of every parametrisation of the training test
    (read from its source, so that neither torch nor the demo model is loaded)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(TRAINING_TEST.read_text(), str(TRAINING_TEST))):
        if not isinstance(node, ast.Call) or ast.unparse(node.func) != "pytest.mark.parametrize":
            continue
        argnames = ast.literal_eval(node.args[0])
        argnames = [a.strip() for a in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
        if "name" not in argnames:
            continue
        i = argnames.index("name")
        for row in ast.literal_eval(node.args[1]):
            names.add(row[i] if len(argnames) > 1 else row)
    return names


def test_the_package_reexports_the_registry():
    assert REEXPORTED is METHODS and ReexportedMethod is Method and reexported_get_method is get_method


def test_registry_order_is_kept():
    # CLIs and benchmarks list and run the methods in this order; new ones are appended.
    assert list(METHODS)[:6] == ["gradascent", "graddiff", "npo", "simnpo", "rmu", "shred"]


@pytest.mark.parametrize("key", list(METHODS))
def test_every_method_builds_by_name(key):
    cls = METHODS[key]
    assert issubclass(cls, Method) and key == cls.name.lower()
    for name in (key, cls.name, cls.name.upper()):
        method = get_method(name)
        assert type(method) is cls and method.name == cls.name


@pytest.mark.parametrize("key", list(METHODS))
def test_every_method_has_a_file_of_its_own(key):
    cls = METHODS[key]
    package, _, module = cls.__module__.rpartition(".")
    assert package == methods_pkg.__name__, cls.__module__
    assert module not in NOT_METHODS, cls.__module__
    assert module.replace("_", "") == key, f"{cls.name} lives in {module}.py, not a file named for it"
    defined = [obj for obj in vars(importlib.import_module(cls.__module__)).values()
               if inspect.isclass(obj) and issubclass(obj, Method) and obj.__module__ == cls.__module__]
    assert defined == [cls], f"{cls.__module__} defines {defined}: one method per file"


def test_no_two_methods_share_a_module():
    modules = [cls.__module__ for cls in METHODS.values()]
    assert len(set(modules)) == len(modules), modules


def test_every_method_file_is_registered():
    """A method file whose import or METHODS entry was forgotten."""
    registered = set(METHODS.values())
    for info in pkgutil.iter_modules(methods_pkg.__path__):
        if info.name in NOT_METHODS:
            continue
        module = importlib.import_module(f"{methods_pkg.__name__}.{info.name}")
        found = [obj for obj in vars(module).values()
                 if inspect.isclass(obj) and issubclass(obj, Method) and obj.__module__ == module.__name__]
        assert found, f"{module.__name__} defines no Method subclass"
        assert set(found) <= registered, f"{module.__name__}: {found} not in METHODS"


def test_the_training_test_trains_every_method():
    trained = _trained_names()
    assert trained, f"no parametrisation over 'name' found in {TRAINING_TEST.name}"
    missing = [cls.name for cls in METHODS.values() if cls.name not in trained]
    assert not missing, f"{TRAINING_TEST.name} does not train {missing}"
    assert trained <= {cls.name for cls in METHODS.values()}, trained


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'nope'") as e:
        get_method("nope")
    for cls in METHODS.values():
        assert cls.name in str(e.value)


def test_unknown_parameter():
    for cls in METHODS.values():
        with pytest.raises(ValueError, match=f"{cls.name}: unknown parameter 'no_such_parameter'"):
            get_method(cls.name, no_such_parameter=1)
