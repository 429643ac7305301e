"""A column of strings as one UTF-8 buffer and end offsets (Arrow's layout), not an object per string.

A dataset's relative paths live through a whole run; as a tuple of ``str`` a 23-character path
costs about 80 bytes (a 72-byte object and its slot), packed it costs 31 (its bytes and an int64
offset), and a listing snapshot stores, compares and hashes the same two arrays without a copy.
Names the file system gave with bytes that are not UTF-8 round-trip through ``surrogateescape``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np

from .._columns import run_positions

_ERRORS = "surrogateescape"
_TAKE_ROWS = 8192


def _position_weights(n: int) -> np.ndarray:
    """Odd pseudo-random uint64 weights for string positions ``0 .. n-1`` (splitmix64 of each position):
    a function of the position alone, so strings of any two columns get the same weights."""
    x = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(multiplier)
    return (x ^ (x >> np.uint64(31))) | np.uint64(1)


class PackedStrings(Sequence[str]):
    """An immutable sequence of strings held as ``blob`` (uint8) and ``offsets`` (int64 end of each string)."""

    __slots__ = ("blob", "offsets")

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.blob, self.offsets = blob, offsets

    @classmethod
    def pack(cls, strings: Iterable[str], prefix: str = "") -> PackedStrings:
        """Pack strings, each with ``prefix`` before it (a PackedStrings without a prefix is returned as it is).

        The prefix is joined in, not added to each string: a folder's names become relative paths
        with no ``str`` made per path.
        """
        if isinstance(strings, PackedStrings) and not prefix:
            return strings
        strings = strings if isinstance(strings, (list, tuple)) else list(strings)
        joined = (prefix + prefix.join(strings) if strings else "").encode("utf-8", _ERRORS)
        extra = len(prefix.encode("utf-8", _ERRORS))
        lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings)) + extra
        if len(joined) != int(lengths.sum()):  # some non-ASCII text: byte lengths differ from character counts
            lengths = np.fromiter((len(s.encode("utf-8", _ERRORS)) + extra for s in strings), dtype=np.int64, count=len(strings))
        return cls(np.frombuffer(joined, dtype=np.uint8), np.cumsum(lengths))

    @classmethod
    def concat(cls, columns: Sequence[PackedStrings]) -> PackedStrings:
        """One column of ``columns`` end to end (one copy of their bytes)."""
        if len(columns) == 1:
            return columns[0]
        if not columns:
            return cls(np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.int64))
        shifts = np.cumsum([0, *(len(c.blob) for c in columns[:-1])])
        return cls(np.concatenate([c.blob for c in columns]),
                   np.concatenate([c.offsets + shift for c, shift in zip(columns, shifts.tolist())]))

    def is_utf8(self) -> bool:
        """Whether every string is valid UTF-8 (names the file system gave with other bytes are not)."""
        try:
            self.blob.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    def __len__(self) -> int:
        return len(self.offsets)

    def _start(self, index: int) -> int:
        """Where string ``index`` (0 <= index <= len) starts in the blob: where the one before it ends."""
        return int(self.offsets[index - 1]) if index else 0

    def _bounds(self, index: int) -> tuple[int, int]:
        n = len(self.offsets)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} strings")
        index %= n
        return self._start(index), int(self.offsets[index])

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> list[str]: ...

    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:  # a run of strings is a run of bytes: decoded from a view, nothing gathered
                stop = max(start, stop)
                first, last = self._start(start), self._start(stop)
                return PackedStrings(self.blob[first:last], self.offsets[start:stop] - first).tolist()
            return self.take(np.arange(start, stop, step)).tolist()
        start, end = self._bounds(int(index))
        return self.blob[start:end].tobytes().decode("utf-8", _ERRORS)

    def __iter__(self) -> Iterator[str]:
        for first in range(0, len(self), _TAKE_ROWS):  # a slice at a time: no list of the whole column held
            yield from self[first : first + _TAKE_ROWS]

    def tolist(self) -> list[str]:
        data = self.blob.tobytes()
        ends = self.offsets.tolist()
        starts = [0, *ends[:-1]]
        if data.isascii():  # a byte per character (file names usually are): one decode, then str slices (4x faster)
            text = data.decode("ascii")
            return [text[start:end] for start, end in zip(starts, ends)]
        return [data[start:end].decode("utf-8", _ERRORS) for start, end in zip(starts, ends)]

    def take(self, rows: Sequence[int] | np.ndarray) -> PackedStrings:
        """The strings at ``rows``, packed (no ``str`` made); all rows in order give this column itself."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        if n == len(self) and (n == 0 or (rows[0] == 0 and bool((np.diff(rows) == 1).all()))):
            return self
        # Each row's start is its predecessor's end, looked up for these rows alone: a block of rows taken
        # from a long column (an export writes its paths 4,096 at a time) costs the block, not the column.
        ends = self.offsets[rows]
        rows = np.where(rows < 0, rows + len(self), rows)  # numpy's negative indices, as ends took them
        starts = np.where(rows > 0, self.offsets[rows - 1], 0) if n else ends
        lengths = ends - starts
        offsets = np.cumsum(lengths)
        blob = np.empty(int(offsets[-1]) if n else 0, dtype=np.uint8)
        # Gathered a slice of rows at a time: the byte positions are int64, 8 bytes per byte of text,
        # so all at once they would cost ~20x the column itself.
        for first in range(0, n, _TAKE_ROWS):
            part = slice(first, first + _TAKE_ROWS)
            count = lengths[part]
            out_start = int(offsets[first] - lengths[first])
            within = run_positions(count)
            blob[out_start : out_start + len(within)] = self.blob[np.repeat(starts[part], count) + within]
        return PackedStrings(blob, offsets)

    def _starts(self) -> np.ndarray:
        """Where each string starts in the blob (int64): where the one before it ends."""
        return np.concatenate(([0], self.offsets[:-1])) if len(self) else self.offsets

    def keys(self) -> np.ndarray:
        """A 64-bit hash of each string's bytes (uint64): equal strings have equal keys; unequal ones almost never do.

        Each byte (plus one) times a fixed random weight for its position in its string, summed with
        uint64 wrap-around, plus the length: vectorised a block of rows at a time, no ``str`` made.
        Keys only compare columns within one process (they are never stored).
        """
        starts, ends = self._starts(), self.offsets
        longest = int((ends - starts).max()) if len(self) else 0
        weights = _position_weights(longest)
        keys = np.empty(len(self), dtype=np.uint64)
        for first in range(0, len(self), _TAKE_ROWS):
            lo, hi = int(starts[first]), int(ends[min(first + _TAKE_ROWS, len(self)) - 1])
            rows_starts, rows_ends = starts[first : first + _TAKE_ROWS] - lo, ends[first : first + _TAKE_ROWS] - lo
            lengths = rows_ends - rows_starts
            weighted = (self.blob[lo:hi].astype(np.uint64) + np.uint64(1)) * weights[run_positions(lengths)]
            summed = np.concatenate((np.zeros(1, dtype=np.uint64), np.cumsum(weighted)))
            keys[first : first + len(lengths)] = summed[rows_ends] - summed[rows_starts] + lengths.astype(np.uint64)
        return keys

    def rows_in(self, other: PackedStrings) -> np.ndarray:
        """For each string, a row of ``other`` holding the same string, -1 where none does (int64).

        Matched by :meth:`keys` and then compared byte for byte, so a key collision costs a miss,
        never a wrong row. Instead of a ``dict`` of ``other``'s strings, which held about 270 bytes a
        row while it lived and took 4.6 s for a million (a +1% run's listing against its snapshot);
        this holds a few int64 columns and took 0.55 s (``tracemalloc`` on, both).
        """
        if self == other:
            return np.arange(len(self), dtype=np.int64)
        theirs = other.keys()
        order = np.argsort(theirs, kind="stable")
        theirs = theirs[order]
        mine = self.keys()
        rows = np.full(len(self), -1, dtype=np.int64)
        if not len(theirs):
            return rows
        by_key = np.argsort(mine)  # searched in rising order: numpy's search starts from the last key's place
        at = np.empty(len(mine), dtype=np.int64)
        at[by_key] = np.minimum(np.searchsorted(theirs, mine[by_key]), len(theirs) - 1)
        candidate = np.flatnonzero(theirs[at] == mine)
        del theirs, mine, by_key
        found = order[at[candidate]]
        same = self._same_strings(candidate, other, found)
        rows[candidate[same]] = found[same]
        return rows

    def _same_strings(self, rows: np.ndarray, other: PackedStrings, other_rows: np.ndarray) -> np.ndarray:
        """Whether string ``rows[i]`` equals ``other``'s string ``other_rows[i]``, for each i (bool), a block of pairs at a time."""
        same = np.diff(self.offsets, prepend=0)[rows] == np.diff(other.offsets, prepend=0)[other_rows]
        for first in range(0, len(rows), _TAKE_ROWS):
            pairs = first + np.flatnonzero(same[first : first + _TAKE_ROWS])
            mine, theirs = self.take(rows[pairs]), other.take(other_rows[pairs])  # equal lengths: the bytes line up
            mismatches = np.concatenate(([0], np.cumsum(mine.blob != theirs.blob)))
            same[pairs] = mismatches[mine.offsets] == mismatches[mine._starts()]
        return same

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedStrings):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.blob, other.blob)
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside: like a list, not hashable

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"PackedStrings([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PackedStrings, (self.blob, self.offsets))
