"""The database servers the router chooses between."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["Node", "Role"]


class Role(enum.Enum):
    PRIMARY = "primary"
    REPLICA = "replica"


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One database server as the router sees it: a bind name and its sync Engine."""

    name: str
    role: Role
    engine: Engine
