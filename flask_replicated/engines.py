"""Make Flask-SQLAlchemy's default engine follow the routing intent."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    from collections.abc import Mapping

    from replicated_core.router import Router

__all__ = ["RoutedEngines"]


class RoutedEngines(dict[str | None, Engine]):
    """``db.engines`` for one app, whose default (``None``) key asks the router.

    Flask-SQLAlchemy documents that ``db.session``, ``db.engine`` and
    ``db.get_engine()`` all use ``db.engines[None]`` for models without a bind key,
    so routing that one entry routes all of them. Other bind keys keep their engine.
    """

    def __init__(self, engines: Mapping[str | None, Engine], router: Router) -> None:
        super().__init__(engines)
        self.router = router

    def __getitem__(self, key: str | None) -> Engine:
        if key is None:
            return self.router.node().engine
        return dict.__getitem__(self, key)
