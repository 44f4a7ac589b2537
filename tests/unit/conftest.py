import pytest

from hq.workers.handlers import Handlers
from hq.workers.schema import open_database
from hq.workers.store import store_for


@pytest.fixture
def handlers(db_spec):
    """A worker's handlers over a store on a fresh database (each engine: see ``engine``)."""
    store = store_for(open_database(db_spec))
    yield Handlers(store)
    store.db.close()
