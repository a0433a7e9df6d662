"""Replica weights and the least-lag preference: of the replicas that may serve a
read, which take it, and how often.

``REPLICATED_REPLICA_WEIGHTS`` gives each replica its share of reads (a replica not
named weighs 1). A replica that weighs 0 is out of rotation: the rules never see it,
so it serves no read, a sticky read never waits for it, and it does not hold back the
drop of a sticky cookie (no read of that client can reach it). Its health is still
checked, so that the status command shows it. With ``REPLICATED_PREFER_LEAST_LAG``,
only the candidates whose lag is within one check interval of the least take reads:
lag is measured at the checks, so a smaller difference is noise.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from .nodes import Node
    from .rules import ReplicaView

__all__ = ["Spread"]

T = TypeVar("T")


class Spread:
    """How one router's reads spread over its replicas; the weights are fixed at
    creation, and a replica found through DNS weighs 1.

    ``weights`` maps replica names to weights (a name missing weighs 1);
    ``least_lag`` keeps only the least lagging candidates, within ``tolerance``
    seconds of the least lag.
    """

    def __init__(
        self,
        replicas: Sequence[Node],
        weights: Mapping[str, float],
        *,
        least_lag: bool = False,
        tolerance: float = 0.0,
    ) -> None:
        self._least_lag = least_lag
        self._tolerance = tolerance
        self._set({node: float(weights.get(node.name, 1.0)) for node in replicas})
        # The last views ``in_rotation`` was given, and its answer: the views of the
        # health registry change only when a replica's state does.
        self._rotation: tuple[Sequence[ReplicaView] | None, Sequence[ReplicaView]] = (None, ())

    def _set(self, weights: dict[Node, float]) -> None:
        self._weights = weights
        self._out = frozenset(node for node, weight in weights.items() if weight == 0)
        positive = {weight for weight in weights.values() if weight > 0}
        self._even = len(positive) <= 1
        # Whether ``narrow`` may hand its input back as it is.
        self._plain = self._even and not self._out and not self._least_lag

    def add(self, node: Node) -> None:
        """Count ``node``, a replica that joined, at weight 1."""
        self._set({**self._weights, node: 1.0})

    def remove(self, node: Node) -> None:
        """Forget ``node``, a replica that left."""
        self._set({n: w for n, w in self._weights.items() if n is not node})

    def weight(self, node: Node) -> float:
        """The weight of ``node`` (1 for a node that is not one of the replicas)."""
        return self._weights.get(node, 1.0)

    def in_rotation(self, views: Sequence[ReplicaView]) -> Sequence[ReplicaView]:
        """``views`` without the replicas that weigh 0 (``views`` itself if none does)."""
        out = self._out
        if not out:
            return views
        last = self._rotation
        if last[0] is views:
            return last[1]
        kept = tuple(view for view in views if view.node not in out)
        self._rotation = (views, kept)
        return kept

    def narrow(
        self,
        choices: Sequence[T],
        node_of: Callable[[T], Node],
        views: Sequence[ReplicaView],
    ) -> tuple[Sequence[T], tuple[float, ...] | None]:
        """Of ``choices`` (one per candidate replica, whose lags ``views`` give), those
        to pick from, and their cumulative weights for ``random.choices`` (None: pick
        evenly). Empty when every choice weighs 0: the primary is then the answer."""
        if self._plain or len(choices) < 2:
            if self._out and len(choices) == 1 and node_of(choices[0]) in self._out:
                return (), None
            return choices, None
        weights = self._weights
        kept = [choice for choice in choices if weights.get(node_of(choice), 1.0) > 0]
        if self._least_lag and len(kept) > 1:
            lags = {view.node: view.lag_seconds for view in views}
            found = [lags.get(node_of(choice), 0.0) for choice in kept]
            bound = min(found) + self._tolerance
            kept = [choice for choice, lag in zip(kept, found, strict=True) if lag <= bound]
        if self._even or len(kept) < 2:
            return kept, None
        shares = [weights.get(node_of(choice), 1.0) for choice in kept]
        if len(set(shares)) == 1:
            return kept, None
        return kept, tuple(itertools.accumulate(shares))
