"""pytest's hooks and fixtures for the suite; the shared helpers are in ``support.py``.

Tests that compare with the oracle or with stored numbers carry the ``reference`` marker: CI runs
them a second time under ``ATEN_CPU_CAPABILITY=default`` (kernels without SIMD), so that a
comparison that holds on one CPU only fails there too. :func:`support.require_oracle` refuses to
serve a test without the marker. Tests marked ``slow`` (pytest inside pytest, torchrun launches,
compilers, finite differences, the GPU check on the CPU, the longest runs) are left out of the fast
loop, ``python -m pytest -q -m "not slow" tests``, and so is every case of a parametrized test but its
first: the fast loop runs each test once. CI runs everything.
"""

from __future__ import annotations

import pytest

from support import REFERENCE_TESTS, require_oracle


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items):
    REFERENCE_TESTS.update(item.nodeid for item in items if item.get_closest_marker("reference"))
    seen = set()
    for item in items:
        if getattr(item, "callspec", None) is None:
            continue
        function = (item.path, item.originalname)
        if function in seen:
            item.add_marker(pytest.mark.slow)  # a further case of a parametrized test
        seen.add(function)


@pytest.fixture
def oracle_cls():
    return require_oracle()
