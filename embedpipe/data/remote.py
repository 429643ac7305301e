"""Sources behind URLs, through fsspec: ``file://``, ``http(s)://``, ``s3://`` (and any protocol fsspec knows).

``fsspec`` is imported only when a URL is read. Whole objects over http(s) (a manifest, an image
listed in one) are fetched with the standard library, so a manifest of http URLs needs no extra;
ranged reads (tar shards, Parquet files) and ``s3://`` need the ``remote`` extra
(``pip install -c constraints.txt "embedpipe[remote]"``: s3fs, which brings aiohttp for http).

Credentials and endpoints come from where the filesystem looks for them (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``~/.aws``), or from ``storage_options``
(``embedpipe extract --storage-option endpoint_url=http://localhost:9000``), passed to fsspec as is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import urllib.parse  # urllib.request (and ssl, http.client: 40 ms) only when a URL is read
from typing import Any

from ..errors import DataError
from .items import untrusted_key

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
TIMEOUT_S = 60  # one stalled request is an error, not a hang
REMOTE_EXTRA = 'pip install -c constraints.txt "embedpipe[remote]"'


def is_url(text: str) -> bool:
    """Whether ``text`` starts with a scheme (``s3://``, ``https://``, ``file://``)."""
    return bool(_SCHEME.match(text))


def local_path(url: str) -> str | None:
    """The local path of a ``file://`` URL; None for any other URL."""
    if not url.lower().startswith("file://"):
        return None
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path) or "/"


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..099}`` ranges (zero-padded as written) and ``{a,b}`` lists, left to right, like the shell.

    Raises:
        DataError: a range that runs backwards.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    if numbers := _RANGE.fullmatch(body):
        first, last = numbers.groups()
        if int(first) > int(last):
            raise DataError(f"brace range {{{body}}} in {pattern} runs backwards: write {{{last}..{first}}}")
        padded = any(len(n.lstrip("-")) > 1 and n.lstrip("-")[0] == "0" for n in (first, last))
        width = max(len(first), len(last)) if padded else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    elif "," in body:
        options = body.split(",")
    else:  # "{x}": no expansion, as in the shell
        return [head + "{" + body + "}" + tail for tail in expand_braces(tail)] if _BRACE.search(tail) else [pattern]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def filesystem(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` for a URL.

    Raises:
        DataError: fsspec, or the protocol's package (s3fs, aiohttp), is not installed.
    """
    try:
        import fsspec.core

        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as error:
        raise DataError(f"reading {url} needs {error.name or 'fsspec'}, which is not installed: {REMOTE_EXTRA}") from None
    except ValueError as error:  # "Protocol not known"
        raise DataError(f"cannot read {url} ({error}): use a file://, http(s):// or s3:// URL") from None


def describe_failure(url: str, error: BaseException) -> str:
    """One line for a failed request: the URL and what the server or network said."""
    import urllib.error
    if isinstance(error, urllib.error.HTTPError):
        return f"{url}: HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"{url}: {error.reason}"
    if isinstance(error, FileNotFoundError):
        return f"{url}: no such object"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{url}: {type(error).__name__}{': ' + text if text else ''}"


def read_url(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """A whole object's bytes.

    Raises:
        OSError: it cannot be fetched; the message names the URL.
        DataError: the protocol needs a package that is not installed.
    """
    path = local_path(url)
    if path is not None:
        with open(path, "rb") as handle:
            return handle.read()
    if url.lower().startswith(("http://", "https://")) and not storage_options:
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                return response.read()
        except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors; ValueError: a malformed URL
            raise OSError(describe_failure(url, error)) from None
    fs, inner = filesystem(url, storage_options)
    try:
        return fs.cat_file(inner)
    except Exception as error:  # noqa: BLE001  botocore and aiohttp raise their own types: each becomes one line
        raise OSError(describe_failure(url, error)) from None


def object_key(info: dict[str, Any]) -> tuple[int, int, int, int]:
    """A remote object's stat key from fsspec's ``info()``: size, modified time (twice) and a hash of its ETag.

    Without a modified time (many http servers) the key is :func:`~.items.untrusted_key`: hashed every run.
    """
    modified = next((info[k] for k in ("LastModified", "mtime", "last_modified", "updated", "modified") if info.get(k)), None)
    if isinstance(modified, str):
        try:
            modified = dt.datetime.fromisoformat(modified.replace("Z", "+00:00"))
        except ValueError:
            modified = None
    if isinstance(modified, dt.datetime):
        modified = modified.timestamp()
    if not isinstance(modified, (int, float)):
        return untrusted_key()
    ns = int(modified * 1e9)
    tag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "")
    return int(info.get("size") or 0), ns, ns, int(hashlib.sha256(tag.encode()).hexdigest()[:15], 16)


def stat_object(url: str, storage_options: dict[str, Any] | None) -> tuple[int, int, int, int]:
    """A remote object's stat key.

    Raises:
        DataError: the object is missing or cannot be reached, named in the message.
    """
    fs, inner = filesystem(url, storage_options)
    try:
        return object_key(fs.info(inner))
    except Exception as error:  # noqa: BLE001  see read_url
        raise DataError(f"cannot read {describe_failure(url, error)}: check the URL, the endpoint and the credentials") from None
