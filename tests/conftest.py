import pytest

from distributed import Pools


@pytest.fixture(scope="session")
def pools():
    p = Pools()
    yield p
    p.close()
