"""Bearer tokens for the Serve application: one for classification (optional), one for administration
(required for the admin routes, which are off without it).

A token comes from a file (a mounted Kubernetes secret) or an environment variable. A file is re-read when it
changes (Kubernetes swaps a secret's files in place when it is rotated), so a rotated secret takes effect at
the next request, not when replicas restart. A token that is configured but empty is an error, never "no
auth": at start-up the replica does not start; a file emptied later admits nobody until it holds a token.
"""

from __future__ import annotations

import hmac
import os
import threading
from pathlib import Path


class TokenError(RuntimeError):
    """The token is configured but unusable (an empty variable or file, an unreadable file)."""


class Token:
    """``check(header)``: whether an ``Authorization`` header carries the token. ``configured`` is False when
    neither the file nor the variable is set."""

    def __init__(self, what: str, env: str, file: str):
        self.what, self.env, self.file = what, env, file
        self._lock = threading.Lock()  # requests run on the event loop and on Serve's threads
        self._seen: tuple | None = None  # the file's (inode, size, mtime) when last read
        self._value: bytes | None = None
        self.configured = bool(file) or env in os.environ
        if self.configured:
            self._current()  # an empty or missing token fails the replica's start, with the reason

    def _current(self) -> bytes:
        if not self.file:
            value = os.environ.get(self.env, "").strip()
            if not value:
                raise TokenError(f"the {self.what} token variable {self.env} is set but empty")
            return value.encode()
        try:
            st = os.stat(self.file)  # follows the symlinks of a mounted secret
            seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as e:
            raise TokenError(f"the {self.what} token file {self.file} cannot be read: {e}") from None
        with self._lock:
            if seen != self._seen:
                try:
                    value = Path(self.file).read_text().strip()
                except (OSError, UnicodeDecodeError) as e:
                    raise TokenError(f"the {self.what} token file {self.file} cannot be read: {e}") from None
                self._seen, self._value = seen, value.encode() if value else None
            if self._value is None:
                raise TokenError(f"the {self.what} token file {self.file} is empty")
            return self._value

    def value(self) -> str:
        """The token itself (a client's: the rollout judge sends it)."""
        return self._current().decode()

    def same_as(self, other: Token) -> bool:
        """Both configured with the same value (a classification token that would also administer)."""
        return self.configured and other.configured and hmac.compare_digest(self._current(), other._current())

    def check(self, authorization: str) -> bool:
        scheme, _, given = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._current())
