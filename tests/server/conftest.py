"""Fixtures of the app tests: the app in-process on the demo model, served on loopback, and a client."""

import pytest

from tests.served import import_app, serve


@pytest.fixture(scope="module")
def app_module():
    return import_app()


@pytest.fixture(scope="module")
def server(app_module):
    with serve(app_module) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)
