"""attnopt.inspect on every flavour of every zoo model finds exactly the expected sites.

Expected specs come from zoo.hf (checked against the models in test_zoo.py). Exports are made
once per session into a dir shared by xdist workers (file-locked)."""
from __future__ import annotations

import functools

import pytest

from zoo import flavours as fl
from zoo import hf
from zoo.testing import check_sites, comparable, inspect_flavour, shared_dir

FLAVOURS = ("module",) + fl.FLAVOURS


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    return shared_dir(tmp_path_factory)


@functools.lru_cache(maxsize=None)
def _model(name: str) -> hf.ZooModel:
    return hf.build(name)


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    return fl.via_compile(_model(name))


def _flavour(name: str, flavour: str, zoo_dir):
    if (name, flavour) in fl.KNOWN_EXPORT_GAPS:
        pytest.skip(fl.KNOWN_EXPORT_GAPS[(name, flavour)])
    if flavour == "compile":
        return _compiled(name), None
    return fl.export(_model(name), flavour, zoo_dir)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("name", hf.NAMES)
def test_detects_expected_sites(name, flavour, zoo_dir):
    obj, inputs = _flavour(name, flavour, zoo_dir)
    sites, _ = inspect_flavour(obj, inputs, flavour)
    check_sites(sites, _model(name).expected, static=True)


@pytest.mark.parametrize("name", hf.NAMES)
def test_same_specs_across_flavours(name, zoo_dir):
    specs = {}
    for flavour in FLAVOURS:
        if (name, flavour) in fl.KNOWN_EXPORT_GAPS:
            continue
        obj, inputs = _flavour(name, flavour, zoo_dir)
        sites, _ = inspect_flavour(obj, inputs, flavour)
        specs[flavour] = [comparable(s.spec) for s in sites]
    ref = specs["module"]
    diff = {f: s for f, s in specs.items() if s != ref}
    assert not diff, f"specs differ from the module's {ref}: {diff}"
