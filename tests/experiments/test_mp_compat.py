"""coel_env.mp_compat: children started under a foreign (loky) global start method."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from coel_env.mp_compat import foreign_start_method, standard_start_method


@pytest.fixture
def loky_start_method():
    pytest.importorskip("joblib.externals.loky.backend.context")  # registers the 'loky' context
    before = mp.get_start_method(allow_none=True)
    mp.set_start_method("loky", force=True)
    try:
        yield
    finally:
        mp.set_start_method(before, force=True)


def _square(x: int) -> int:
    return x * x


def test_a_standard_start_method_is_left_alone():
    before = mp.get_start_method(allow_none=True)
    assert foreign_start_method() is None
    with standard_start_method():
        assert mp.get_start_method(allow_none=True) == before


def test_children_start_under_a_loky_start_method(loky_start_method):
    assert foreign_start_method() == "loky"
    with standard_start_method():
        assert mp.get_start_method() == "forkserver"
        with mp.get_context("forkserver").Pool(1) as pool:
            assert pool.map_async(_square, [3]).get(timeout=60) == [9]  # without the fix: children die, hang
    assert mp.get_start_method() == "loky"  # the pool's own method is back
