"""Every error driftloop raises on purpose is a DriftloopError, importable where its code lives."""

import pytest

from components.score import OutputExistsError
from driftloop.app.tenants import TenantError
from driftloop.core import errors
from driftloop.core.errors import DataSourceError, DriftloopError, MonitorError, ServingError
from monitoring.events import EventError
from monitoring.store import StoreUnavailable
from serving.traffic import DuplicateLabel


@pytest.mark.parametrize("cls, base", [
    (DuplicateLabel, ServingError),
    (TenantError, DriftloopError),
    (OutputExistsError, DataSourceError),
    (EventError, MonitorError),
    (StoreUnavailable, EventError),
])
def test_errors_defined_beside_their_code_join_the_hierarchy(cls, base):
    assert issubclass(cls, base) and issubclass(cls, DriftloopError)


def test_the_docstring_tree_names_every_class():
    for name in errors.__all__:
        assert name in errors.__doc__
    for cls in (DuplicateLabel, TenantError, OutputExistsError, EventError, StoreUnavailable):
        assert cls.__name__ in errors.__doc__
