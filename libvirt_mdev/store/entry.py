"""One row of ``store list`` (and what gc decides on): a manifest, its spent marker and its stream."""
from __future__ import annotations

from dataclasses import dataclass

from .manifest import Manifest
from .streams import ACCEPTED, StreamInfo


@dataclass
class Entry:
    """One row of :meth:`.store.Store.list`: a manifest, or why it could not be read."""

    id: str
    manifest: Manifest | None
    spent: bool
    spent_at: int | None = None
    problem: str | None = None
    #: the stream the state was stored from (None: stored directly, e.g. ``put_state``)
    stream: StreamInfo | None = None

    @property
    def status(self) -> str:
        """ready, spent, open (its stream is still running), refused or untrusted."""
        if self.manifest is None:
            return "untrusted"
        if self.stream is not None and self.stream.state != ACCEPTED:
            return self.stream.state
        return "spent" if self.spent else "ready"

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"id": self.id, "spent": self.spent, "spent_at": self.spent_at,
                                  "status": self.status}
        if self.manifest is not None:
            out.update(self.manifest.summary())
        if self.stream is not None:
            out["stream"] = self.stream.to_json()
        if self.problem:
            out["problem"] = self.problem
        return out
