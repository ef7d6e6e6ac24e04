from abc import ABC, abstractmethod


class Stateful(ABC):
    """Mixin for objects whose output depends on what they have seen in earlier calls.

    A stateful aggregator, weighting or scalarizer keeps information between calls (moving
    averages, step counters, learned log-scales...). One instance holds one state, so use one
    instance per independent stream of Jacobians (for example, one per parameter group).

    Subclasses implement :meth:`reset`, which brings the object back to the behaviour it had right
    after construction.
    """

    @abstractmethod
    def reset(self) -> None:
        """Forget everything accumulated across calls."""
