"""The demo apps: add an item, be served by the primary; a new visitor gets the replica."""

from __future__ import annotations

import sqlite3

from examples.demo import SCHEMA
from examples.flask_app import create_app as create_flask_app
from examples.quart_app import create_app as create_quart_app


def _files(tmp_path):
    paths = tmp_path / "p.sqlite3", tmp_path / "r.sqlite3"
    for path in paths:
        with sqlite3.connect(path) as conn:
            conn.execute(SCHEMA.format(pk="INTEGER PRIMARY KEY"))
    return paths


def test_flask_demo(tmp_path):
    primary, replica = _files(tmp_path)
    app = create_flask_app(f"sqlite:///{primary}", f"sqlite:///{replica}")
    writer, visitor = app.test_client(), app.test_client()
    page = writer.post("/items", data={"name": "pear"}, follow_redirects=True).text
    assert "<li>pear</li>" in page
    assert 'id="node">master (primary)' in page
    assert "the client wrote recently" in page
    page = visitor.get("/").text
    assert "<li>pear</li>" not in page
    assert 'id="node">slave (replica)' in page
    assert "read-only request" in page


async def test_quart_demo(tmp_path):
    primary, replica = _files(tmp_path)
    app = create_quart_app(f"sqlite+aiosqlite:///{primary}", f"sqlite+aiosqlite:///{replica}")
    async with app.test_app() as test_app:
        writer, visitor = test_app.test_client(), test_app.test_client()
        response = await writer.post("/items", form={"name": "plum"}, follow_redirects=True)
        page = await response.get_data(as_text=True)
        assert "<li>plum</li>" in page
        assert 'id="node">master (primary)' in page
        page = await (await visitor.get("/")).get_data(as_text=True)
        assert "<li>plum</li>" not in page
        assert 'id="node">slave (replica)' in page
