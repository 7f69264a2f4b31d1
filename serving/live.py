"""A gallery that may be rewritten while the service runs (``embed.py`` again, ``--update``):
:class:`LiveSearcher` holds the Searcher requests use and swaps in a new one when the gallery's
file changes.

Each request takes ``live.current()`` once and uses that Searcher to its end, so a swap is
atomic: requests in flight finish on the old gallery, the next ones use the new. At most every
``check_every`` seconds a request first looks at the gallery file and its FAISS index file
(their size, modification time and inode: two stats), or at a LanceDB gallery's record; when they changed, that request reopens
the gallery and its index (:meth:`retrieval.searcher.Searcher.reopen`: the models are kept
unless the run's weights changed) and swaps, while requests arriving meanwhile go on with the
old one. A gallery that cannot be opened (half written, stale, its index not rebuilt yet) is
logged once and tried again when the files change again; the old one is served meanwhile.
``POST /api/reload`` reopens at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from retrieval.faiss_index import index_path
from retrieval.searcher import Searcher
from tfcbir import UserError

log = logging.getLogger("tfcbir")


def file_stamp(path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten: ``(size, mtime_ns, inode)``; None when missing."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_size, found.st_mtime_ns, found.st_ino


def gallery_stamp(gallery_path) -> tuple:
    """The :func:`file_stamp` of a gallery file and of its FAISS index (None when it has none)."""
    return file_stamp(gallery_path), file_stamp(index_path(gallery_path))


def searcher_stamp(searcher: Searcher) -> tuple:
    """What changes when ``searcher``'s gallery is rewritten: its files' stamps, or a LanceDB
    gallery's record (:meth:`retrieval.searcher.Searcher.table_stamp`)."""
    return searcher.table_stamp() or gallery_stamp(searcher.gallery.path)


class LiveSearcher:
    """The current Searcher (see the module docstring). Each of ``on_swap`` (and those added
    with :meth:`when_swapped`) is called with each new one. ``check_every`` 0: only
    :meth:`reload` swaps."""

    def __init__(
        self,
        searcher: Searcher,
        *,
        check_every: float = 0.0,
        on_swap: Callable[[Searcher], None] | None = None,
    ):
        self.searcher = searcher
        self.check_every = check_every
        self._listeners = [on_swap] if on_swap is not None else []
        self.last_error: str | None = None  # why the rewritten gallery was not swapped in
        self._stamp = searcher_stamp(searcher)
        self._checked = time.monotonic()
        self._reloading = threading.Lock()

    def current(self) -> Searcher:
        return self.searcher

    def when_swapped(self, listener: Callable[[Searcher], None]) -> None:
        """Call ``listener(new_searcher)`` after each swap (e.g. to drop a cache)."""
        self._listeners.append(listener)

    def due(self) -> bool:
        """Whether it is time to look at the gallery file (:meth:`check` would stat it)."""
        return (
            self.check_every > 0
            and self.searcher.can_reopen
            and time.monotonic() - self._checked >= self.check_every
        )

    def check(self) -> Searcher:
        """The Searcher a request should use: the current one, after swapping in the gallery
        file's new contents if it is time to look and they changed (a blocking call)."""
        if not self.due():
            return self.searcher
        if not self._reloading.acquire(blocking=False):  # another request is reloading
            return self.searcher
        try:
            self._checked = time.monotonic()
            stamp = searcher_stamp(self.searcher)
            if stamp != self._stamp:
                self._stamp = stamp  # a gallery that cannot be opened: tried again once changed
                self._swap_quietly()
        finally:
            self._reloading.release()
        return self.searcher

    def reload(self) -> bool:
        """Reopen the gallery now (waiting for a reload in progress): whether another gallery
        was swapped in (False: the file holds the same one). UserError when it cannot be
        opened; the current one stays."""
        if not self.searcher.can_reopen:
            raise UserError("this service's gallery was not opened from a run: it cannot reload")
        with self._reloading:
            self._checked = time.monotonic()
            return self._swap()

    def _swap(self) -> bool:
        stamp = searcher_stamp(self.searcher)
        found = self.searcher.reopen()
        self._stamp, self.last_error = stamp, None
        if found.gallery.gallery_id == self.searcher.gallery.gallery_id:
            return False  # touched, not rewritten
        self.searcher = found
        log.info(
            "gallery %s rewritten: now searching its %d images", found.gallery.path, len(found)
        )
        for listener in self._listeners:
            listener(found)
        return True

    def _swap_quietly(self) -> None:
        try:
            self._swap()
        except UserError as error:
            message = str(error)
            if message != self.last_error:  # once per problem, not once per check
                log.warning("the rewritten gallery is not served yet: %s", message)
            self.last_error = message


__all__ = ["LiveSearcher", "file_stamp", "gallery_stamp", "searcher_stamp"]
