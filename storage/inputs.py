"""The records of listed inputs that the dataset manifest and the shard records persist: ``InputRef`` (one
input), ``Listing`` (the inputs of a source) and ``KnownTars`` (tar shards listed before).

Listing itself (every form ``--images`` accepts) and reading inputs are in ``workers.ingest.sources``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class InputRef:
    """One input: ``key`` names it in every output (a path, a URL, or ``shard.tar/member``), ``uri`` is
    what is read (with ``offset``/``length`` for a member inside a container)."""

    key: str
    uri: str
    offset: int = -1
    length: int = -1
    label: str | None = None
    stamp: str = ""  # what changes when the input changes (size, mtime), for resume decisions

    def signature(self) -> bytes:
        """Everything that identifies this input and its current state, for fingerprints."""
        return f"{self.key}\0{self.uri}\0{self.offset}\0{self.length}\0{self.label}\0{self.stamp}\n".encode()


@dataclass
class Listing:
    """The inputs of a source, in a stable order, and the entries found unusable while listing."""

    refs: list[InputRef] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)

    def extend(self, other: Listing) -> None:
        self.refs.extend(other.refs)
        self.problems.extend(other.problems)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for r in self.refs:
            digest.update(r.signature())
        for key, reason in self.problems:
            digest.update(f"!{key}\0{reason}\n".encode())
        return digest.hexdigest()[:16]


# the key of a distractor input (``distractors:``) is its own key under this prefix: in the dataset
# manifest and the feature store's ``path`` column it stays apart from the collection's inputs
DISTRACTOR_PREFIX = "distractor:"


def is_distractor(key: str) -> bool:
    return key.startswith(DISTRACTOR_PREFIX)


def as_distractors(listing: Listing) -> Listing:
    """``listing``'s inputs as distractors: the same inputs under prefixed keys."""
    refs = [replace(r, key=DISTRACTOR_PREFIX + r.key) for r in listing.refs]
    return Listing(refs, [(DISTRACTOR_PREFIX + key, reason) for key, reason in listing.problems])


KnownTars = dict[str, tuple[str, tuple[InputRef, ...]]]  # resolved path -> (stamp then, samples)
