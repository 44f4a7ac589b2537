import pytest

from hq.workers.handlers import Handlers
from hq.workers.schema import open_database
from hq.workers.store import Store


@pytest.fixture
def handlers(tmp_path):
    """A worker's handlers over a store on a fresh SQLite file."""
    db = open_database(str(tmp_path / "hq.db"))
    yield Handlers(Store(db))
    db.close()
