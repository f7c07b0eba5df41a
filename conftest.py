"""Fixtures for both test folders (tests/, kernels/tests/)."""
import pytest


@pytest.fixture(autouse=True)
def _fresh_scan_choices():
    """Tests swap scan backends in and out (monkeypatch): no test sees another's cached "auto" choice."""
    from nnunet_mamba.ops import scan
    scan._CHOICES.clear()
    yield
    scan._CHOICES.clear()
