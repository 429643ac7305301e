"""The exceptions embedpipe raises on bad input or a broken environment.

Every message names the problem and what to do about it. Library code raises
these; only :mod:`embedpipe.cli` turns them into a one-line message and a
non-zero exit status, one per kind (2 is click's own, for a bad command line):

====  ====================  ==================================================
code  error                 what went wrong
====  ====================  ==================================================
1     EmbedpipeError        anything else (and ``cache verify`` finding damage)
3     BackboneError         the backbone cannot be built
4     CacheError            the cache cannot be read or written
5     ImageDecodeError      an image cannot be decoded under ``--on-error fail``
6     HeadError             a head cannot be fitted, loaded or applied
7     FineTuneError         fine-tuning cannot start or resume
8     BenchError            a bench cannot start, or its results are unreadable
9     WeightsError          a weights file is unreadable or does not fit
10    DataError             the dataset cannot be read
11    ExploreError          neighbours, audit or export cannot run (an extra missing, bad k)
====  ====================  ==================================================
"""

from __future__ import annotations


class EmbedpipeError(Exception):
    """Base class: a problem the user can fix, described in one line."""

    exit_code = 1


class DataError(EmbedpipeError):
    """The dataset cannot be read: missing folder, bad manifest, no images."""

    exit_code = 10


class BackboneError(EmbedpipeError):
    """The backbone cannot be built: unknown name, weights unavailable."""

    exit_code = 3


class WeightsError(BackboneError):
    """A weights file is unreadable or does not fit the architecture."""

    exit_code = 9


class CacheError(EmbedpipeError):
    """The cache is unreadable, of another format version, or cannot be written."""

    exit_code = 4


class ImageDecodeError(EmbedpipeError):
    """One image could not be decoded (and ``on_error='fail'`` was asked for)."""

    exit_code = 5


class HeadError(EmbedpipeError, ValueError):
    """A head cannot be fitted or restored: too few examples per class, a foreign state.

    Also a :class:`ValueError`, because scikit-learn's estimator contract (and its
    ``check_estimator``) expects invalid training data to raise one.
    """

    exit_code = 6


class FineTuneError(EmbedpipeError):
    """Fine-tuning cannot start or resume: bad options, no validation split, a foreign run folder."""

    exit_code = 7


class BenchError(EmbedpipeError):
    """A bench cannot start: bad grid, unknown backbone list, results of another format."""

    exit_code = 8


class ExploreError(EmbedpipeError):
    """Neighbours, audit or export cannot run: an optional extra is missing, k is out of range, an unknown format."""

    exit_code = 11
