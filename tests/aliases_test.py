"""The 0.2 flat module paths still import (one release), as the same module objects, warning."""

import importlib
import sys
import warnings

import pytest

import dsjax
from dsjax import _aliases


@pytest.mark.parametrize("old", sorted(_aliases.MOVED))
def test_old_path_is_the_new_module_and_warns(old):
    new = "dsjax." + _aliases.MOVED[old]
    sys.modules.pop(f"dsjax.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"dsjax.{old}")
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the alias does not rename the real module
    assert any(new in str(w.message) and w.category is DeprecationWarning for w in caught)


def test_old_submodule_path_and_from_import():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import dsjax.layers.rope as rope  # noqa: PLC0415
        from dsjax.layers.moe import route  # noqa: PLC0415
    assert route is dsjax.route
    assert rope is importlib.import_module("dsjax.model.layers.rope")


def test_names_that_did_not_move_are_not_aliased():
    assert _aliases.new_name("dsjax.model") is None
    assert _aliases.new_name("dsjax.plan") is None
    assert _aliases.new_name("dsjaxx.hf") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("dsjax.no_such_module")
