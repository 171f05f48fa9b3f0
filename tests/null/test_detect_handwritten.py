"""attnopt.inspect on every hand-written case (zoo.handwritten) in every flavour: positives give
exactly the expected sites, near misses give no site and a rejection naming the reason."""
from __future__ import annotations

import functools

import pytest

from zoo import flavours as fl
from zoo import handwritten as hw
from zoo.testing import check_rejected, check_sites, comparable, inspect_flavour, shared_dir

PARAMS = [(c, f) for c in hw.CASE_NAMES for f in fl.hand_flavours(c)]


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    return shared_dir(tmp_path_factory)


@functools.lru_cache(maxsize=None)
def _case(name: str) -> hw.HandCase:
    return hw.get(name)


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    return fl.via_compile(_case(name).as_zoo())


def _flavour(name: str, flavour: str, zoo_dir):
    if (name, flavour) in fl.KNOWN_EXPORT_GAPS:
        pytest.skip(fl.KNOWN_EXPORT_GAPS[(name, flavour)])
    if flavour == "compile":
        return _compiled(name), None
    return fl.export(_case(name).as_zoo(), flavour, zoo_dir)


@pytest.mark.parametrize("name,flavour", PARAMS)
def test_handwritten(name, flavour, zoo_dir):
    case = _case(name)
    obj, inputs = _flavour(name, flavour, zoo_dir)
    sites, rejected = inspect_flavour(obj, inputs, flavour)
    if case.near_miss:
        check_rejected(sites, rejected, case.expected_reject)
    else:
        check_sites(sites, case.expected, static=True)


@pytest.mark.parametrize("name", [c.name for c in hw.cases() if not c.near_miss])
def test_same_specs_across_flavours(name, zoo_dir):
    specs = {}
    for flavour in fl.hand_flavours(name):
        if (name, flavour) in fl.KNOWN_EXPORT_GAPS:
            continue
        obj, inputs = _flavour(name, flavour, zoo_dir)
        specs[flavour] = [comparable(s.spec) for s in inspect_flavour(obj, inputs, flavour)[0]]
    ref = specs["module"]
    diff = {f: s for f, s in specs.items() if s != ref}
    assert not diff, f"specs differ from the module's {ref}: {diff}"
