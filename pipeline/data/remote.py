"""Shards read from data.base_url: http(s) here, with urllib; any other scheme (pipe:, ...) through
webdataset's gopen.

A transfer that fails ends in a `ShardStoreError`: one paragraph naming the URL (its credentials
masked), the transfer's own reason (the HTTP status, the socket's error, the command's exit status)
and what to check. It is raised where the bytes are read, so a shard that never arrived is never
called corrupt: only bytes that did arrive are decoded (shards.py). A transient failure (connection
refused, timed out, HTTP 5xx) is tried again with growing pauses for up to `data.retry_s` (60 s by
default: a server restart or a short overload passes without ending a job of many nodes), and then
exits 75 (EX_TEMPFAIL: the job may be retried as it is); a permanent one (HTTP 404, 401/403, a bad
URL) exits 2 at once.

http(s) is read here rather than by webdataset's `curl` pipe: curl's `-s` hid its reason and its
exit status surfaced only as an OSError from the pipe's close, after the empty stream had already
been decoded; and the URL, credentials included, stood on curl's command line for any `ps` to see.
"""

from __future__ import annotations

import base64
import errno
import http.client
import io
import signal
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from pipeline.errors import EX_TEMPFAIL, DataError
from pipeline.files import mask_url

EX_PERMANENT = 2  # retrying the job as it is cannot help: fix the URL, the credentials or the upload
TIMEOUT_S = 30.0  # connect, and each read: no byte for this long is a failed transfer
RETRY_S = 60.0  # data.retry_s's default


def backoff(budget_s: float) -> tuple[float, ...]:
    """Pauses before each new try of a transient failure: 1, 2, 4, ... s, at most 15 s each, adding up to budget_s."""
    delays, total, step = [], 0.0, 1.0
    while total + min(step, 15.0) <= budget_s:
        delays.append(min(step, 15.0))
        total += delays[-1]
        step *= 2
    return tuple(delays)


RETRY_DELAYS_S = backoff(RETRY_S)  # a transient failure is tried again after each of these, then reported
PROBE_THREADS = 8
_CHUNK = 1 << 16
MAX_BREAKS = 3  # a transfer that breaks off more often than this is reported (transient)


class ShardStoreError(DataError):
    """A shard could not be transferred from data.base_url (not: its bytes were bad)."""

    exit_code = EX_PERMANENT

    def __init__(self, url: str, reason: str, advice: str, transient: bool):
        self.message = f"cannot read shard {mask_url(url)}: {reason}; {advice}" + (
            f". This may pass: the job can be retried as it is (exit {EX_TEMPFAIL})" if transient else "")
        super().__init__(self.message)
        self.transient = transient
        self.exit_code = EX_TEMPFAIL if transient else EX_PERMANENT
        self._args = (url, reason, advice, transient)

    def __reduce__(self):  # crosses processes whole (a loader worker, a broadcast between ranks)
        return type(self), self._args, self.__dict__

    def __str__(self) -> str:
        # webdataset's tar iterator appends " @ <stream>" to the args of what passes through it.
        return self.message


def is_http(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.lower() in ("http", "https")


_UP = "check that the shard server is running and that data.base_url names its host and port"
_PATH = ("check data.base_url (the prefix of the manifest's shard paths, such as train/train-00000.tar) and that "
         "the prepared dataset was uploaded under it")
_AUTH = "check the credentials in data.base_url (user:token@) and that they may read the shards"


def _http_status(code: int, reason: str) -> tuple[str, str, bool]:
    said = f"the server answered HTTP {code} {reason}".rstrip()
    if code in (401, 403):
        return said, _AUTH, False
    if code in (404, 410):
        return said, _PATH, False
    if code in (408, 429) or code >= 500:
        return said, "the server is failing or overloaded; check its health", True
    return said, "check data.base_url", False


def _classify(err: BaseException) -> tuple[str, str, bool]:
    """(the transfer's reason, what to check, transient) of a failed request or read."""
    if isinstance(err, urllib.error.HTTPError):
        return _http_status(err.code, str(err.reason or ""))
    if isinstance(err, urllib.error.URLError) and isinstance(err.reason, BaseException):
        err = err.reason
    if isinstance(err, ConnectionRefusedError):
        return f"the connection was refused ({err})", _UP, True
    if isinstance(err, TimeoutError):
        return (f"no answer within {TIMEOUT_S:.0f} s ({err})", "check that the server is up and reachable from "
                "here (network, firewall, proxy settings)", True)
    if isinstance(err, socket.gaierror):
        again = err.errno == socket.EAI_AGAIN
        return f"its host name could not be resolved ({err.strerror or err})", "check the host name in data.base_url", again
    if isinstance(err, ssl.SSLCertVerificationError):
        return (f"its TLS certificate was refused ({err.verify_message or err})", "check the server's certificate "
                "(or point SSL_CERT_FILE at the CA that signed it)", False)
    if isinstance(err, (ValueError, http.client.InvalidURL)):
        return f"it is not a valid URL ({mask_url(str(err))})", "check data.base_url", False
    if isinstance(err, urllib.error.URLError):
        return f"the request failed ({mask_url(str(err.reason))})", "check data.base_url", False
    if isinstance(err, (OSError, http.client.HTTPException)):
        permanent = isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM)
        return f"the transfer failed ({_detail(err)})", _UP, not permanent
    raise err


def _detail(err: BaseException) -> str:
    return mask_url(getattr(err, "strerror", None) or str(err) or type(err).__name__)


def _request(url: str, method: str = "GET", offset: int = 0):
    """One request, credentials from the URL's userinfo sent as HTTP basic auth (never to a redirect's target)."""
    parts = urllib.parse.urlsplit(url)
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    req = urllib.request.Request(bare, method=method)
    if parts.username is not None:
        user = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        req.add_unredirected_header("Authorization", "Basic " + base64.b64encode(user.encode()).decode())
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(req, timeout=TIMEOUT_S)


def _with_retries(url: str, attempt, what: str = "", delays: tuple[float, ...] | None = None):
    """attempt()'s value; a transient failure is tried again after each of `delays` (RETRY_DELAYS_S), then reported."""
    delays = RETRY_DELAYS_S if delays is None else delays
    for delay in (*delays, None):
        try:
            return attempt()
        except (OSError, http.client.HTTPException, ValueError) as err:
            if isinstance(err, urllib.error.HTTPError):
                err.close()  # its socket, at once rather than when it is collected
            reason, advice, transient = _classify(err)
        if not transient or delay is None:
            tries = f" (tried {len(delays) + 1} times over {sum(delays):.0f} s)" if transient and delays else ""
            raise ShardStoreError(url, f"{what}{reason}{tries}", advice, transient) from None
        time.sleep(delay)
    raise AssertionError("unreachable")


class HttpShard(io.RawIOBase):
    """A shard's bytes over http(s). A transfer that breaks off is taken up where it stopped (a Range
    request, or the bytes already read skipped), as a refused one is tried again."""

    def __init__(self, url: str, delays: tuple[float, ...] | None = None):
        super().__init__()
        self.url = url
        self.delays = RETRY_DELAYS_S if delays is None else delays
        self.got = 0
        self.breaks = 0
        self.response = _with_retries(url, lambda: _request(url), delays=self.delays)

    def __repr__(self) -> str:
        return f"<shard {mask_url(self.url)}>"

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                n = self.response.readinto(buffer)
                if not n and len(buffer) and self.response.length:  # readinto says nothing of a short body
                    raise http.client.IncompleteRead(b"", self.response.length)
                break
            except (OSError, http.client.HTTPException) as err:
                self._take_up(err)
        self.got += n
        return n

    def _take_up(self, broke: BaseException) -> None:
        self.response.close()
        self.breaks += 1
        what = f"the transfer broke off after {self.got} bytes ({_detail(broke)})"
        if self.breaks > MAX_BREAKS:
            raise ShardStoreError(self.url, f"{what}, {self.breaks} times", _UP, True)
        self.response = _with_retries(self.url, self._reopen, f"{what}, and taking it up failed: ", self.delays)

    def _reopen(self):
        response = _request(self.url, offset=self.got)
        try:
            if response.status == 206:  # the rest, if the server says it starts where the stream stopped
                if not (response.headers.get("Content-Range") or "").startswith(f"bytes {self.got}-"):
                    raise http.client.HTTPException(f"the server resumed at another byte "
                                                    f"({response.headers.get('Content-Range')!r}, wanted {self.got})")
                return response
            skip = self.got  # no Range support: the whole shard again, the part already read skipped
            while skip:
                chunk = response.read(min(skip, _CHUNK))
                if not chunk:
                    raise http.client.IncompleteRead(b"", skip)
                skip -= len(chunk)
            return response
        except BaseException:
            response.close()
            raise

    def close(self) -> None:
        if getattr(self, "response", None) is not None:
            self.response.close()
        super().close()


def probe_size(url: str, delays: tuple[float, ...] | None = None) -> int | None:
    """The shard's size as the server gives it (HEAD); None where it does not say."""
    def head():
        try:
            with _request(url, method="HEAD") as response:
                return response.headers.get("Content-Length")
        except urllib.error.HTTPError as err:
            if err.code in (405, 501):  # HEAD not supported: nothing to check, the read will tell
                err.close()
                return None
            raise
    length = _with_retries(url, head, delays=delays)
    return int(length) if length and length.isdigit() else None


def probe_sizes(urls: list[str], delays: tuple[float, ...] | None = None) -> list[int | None]:
    """probe_size of each: the first alone (an unreachable server is reported once, at once), then the rest in
    parallel; the first failure among those ends the probe without waiting for the others."""
    if not urls:
        return []
    first = probe_size(urls[0], delays)
    pool = ThreadPoolExecutor(PROBE_THREADS)
    try:
        return [first, *pool.map(lambda url: probe_size(url, delays), urls[1:])]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class PipeShard(io.RawIOBase):
    """A gopen stream (pipe:, gs://, file:...). A command's exit status is its transfer's verdict,
    checked when its output ends, before what it wrote is judged."""

    def __init__(self, url: str):
        super().__init__()
        from webdataset.gopen import Pipe, gopen

        self.url = url
        try:
            self.stream = gopen(url, "rb")
        except Exception as err:  # noqa: BLE001 - gopen raises many types for an unusable URL
            raise ShardStoreError(url, f"it cannot be opened ({_detail(err)})", "check data.base_url", False) from None
        self.proc = self.stream.proc if isinstance(self.stream, Pipe) else None
        if self.proc is not None:
            self.stream.ignore_errors = True  # its exit status is judged here, in words

    def __repr__(self) -> str:
        return f"<shard {mask_url(self.url)}>"

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        if not data:
            self.check()
        buffer[:len(data)] = data
        return len(data)

    def check(self) -> None:
        """Raise the command's failure, if it failed (waits for it to end)."""
        if self.proc is None:
            return
        self.stream.stream.close()  # a command still writing (the reader stopped at the archive's end) gets SIGPIPE
        status = self.proc.wait()
        if status not in (0, 141, -signal.SIGPIPE):
            raise ShardStoreError(self.url, f"its command exited with status {status}", "run the command of "
                                   "data.base_url by hand to see why", False)

    def close(self) -> None:
        if getattr(self, "stream", None) is not None and not self.closed:
            self.stream.close()
        super().close()


def open_remote(url: str, delays: tuple[float, ...] | None = None) -> io.RawIOBase:
    return HttpShard(url, delays) if is_http(url) else PipeShard(url)
