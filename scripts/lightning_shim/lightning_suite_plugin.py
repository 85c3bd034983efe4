"""pytest plugin of scripts/lightning_suite.py: once the tests are collected, a call of a missing
Lightning name raises (during collection it returns a placeholder, so that parametrize lists build)."""
import os


def pytest_collection_finish(session) -> None:  # noqa: ANN001 - pytest's Session
    from lightning import STRICT_VARIABLE

    os.environ[STRICT_VARIABLE] = "1"
