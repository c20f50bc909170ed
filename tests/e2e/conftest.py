import os

import pytest


@pytest.fixture(autouse=True)
def _restore_rendezvous_env():
    """In-process runs set MASTER_ADDR/PORT; put them back afterwards so a later test (a Slurm job or a
    subprocess inheriting the environment) never tries to bind a port this process still holds."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
