"""Per-item outcomes of batch operations."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

from kvstack.store.errors import BatchFailed, StoreError

__all__ = ["BatchResult", "ItemOutcome"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ItemOutcome(Generic[T]):
    """One item of a batch: its value, or the typed error it failed with."""

    index: int
    key: str
    value: T | None = None
    error: StoreError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> T:
        """The value, or raise the item's error."""
        if self.error is not None:
            raise self.error
        return self.value  # pyrefly: ignore[bad-return] -- None only for ops whose T is None


class BatchResult(Sequence[ItemOutcome[T]]):
    """The outcomes of a batch, in request order."""

    def __init__(self, outcomes: list[ItemOutcome[T]]) -> None:
        self.outcomes = outcomes

    @overload
    def __getitem__(self, index: int) -> ItemOutcome[T]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ItemOutcome[T]]: ...
    def __getitem__(self, index: int | slice) -> ItemOutcome[T] | Sequence[ItemOutcome[T]]:
        return self.outcomes[index]

    def __len__(self) -> int:
        return len(self.outcomes)

    def __iter__(self) -> Iterator[ItemOutcome[T]]:
        return iter(self.outcomes)

    def __repr__(self) -> str:
        return f"<BatchResult of {len(self)}: {len(self.failures())} failed>"

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    def failures(self) -> dict[int, StoreError]:
        return {o.index: o.error for o in self.outcomes if o.error is not None}

    def raise_for_errors(self) -> None:
        """Raise BatchFailed naming every failed item."""
        failures = self.failures()
        if failures:
            raise BatchFailed(failures, total=len(self))

    def values(self) -> list[T]:
        """Every value, in order; raises BatchFailed if any item failed."""
        self.raise_for_errors()
        return [o.unwrap() for o in self.outcomes]
