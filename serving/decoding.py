"""Bounded work per upload: how many images are decoded at once (:class:`DecodeQueue`) and how
large an image may be (:func:`default_max_pixels`).

Decoding is what costs memory: an image of P pixels takes 4P bytes as RGB in PIL (more on the
way for one with transparency) however small its file, so a 38 KB PNG of one colour can ask for
160 MB. The service therefore decodes (and searches) uploads on ``workers`` threads of their own
(2 by default: the embedding itself is serialised by the Searcher's lock, so more decoders buy
little speed and cost a decode's memory each); up to ``waiting`` more uploads wait for one, and
past that an upload is answered 503 at once. Confining the decodes to a few threads also keeps
the memory they free reusable (the C allocator keeps an arena per thread that allocated).
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

from serving.errors import BadRequest

# An upload may have this many times the pixels the model reads (its resize, else its input
# size): 64x is 8x the side, room for any crop or thumbnail a user has at hand ...
MODEL_PIXELS_MULTIPLE = 64
# ... and never fewer than a 12-megapixel photo's (4032 x 3024 fits, in either orientation):
# what a phone takes. A JPEG that large is decoded at a reduced scale (libjpeg's draft mode)
# for a small model, so its cost is far below its size; a PNG of this size costs 48 MB as RGB.
FLOOR_PIXELS = 4096 * 3072
DEFAULT_DECODERS = 2
DEFAULT_WAITING = 16


def default_max_pixels(model_input: tuple[int, int] | None) -> int:
    """The largest upload accepted, in pixels: MODEL_PIXELS_MULTIPLE x ``model_input``'s
    ``(h, w)`` pixels, at least FLOOR_PIXELS (also when there is no image model)."""
    if model_input is None:
        return FLOOR_PIXELS
    height, width = model_input
    return max(MODEL_PIXELS_MULTIPLE * height * width, FLOOR_PIXELS)


class Busy(BadRequest):
    """Every decoder busy and the queue full: 503 with Retry-After."""


class DecodeQueue:
    """At most ``workers`` calls run at once, on threads of their own; up to ``waiting`` more
    wait for one (in order); beyond that :meth:`run` raises :class:`Busy` at once. Used from
    the event loop only (its count needs no lock)."""

    def __init__(self, workers: int = DEFAULT_DECODERS, waiting: int = DEFAULT_WAITING):
        if workers < 1 or waiting < 0:
            raise ValueError(f"workers {workers} must be >= 1 and waiting {waiting} >= 0")
        self.workers, self.waiting = workers, waiting
        self.pending = 0  # running or waiting
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="tfcbir-decode")

    async def run(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` on a decoder thread, its result awaited."""
        if self.pending >= self.workers + self.waiting:
            raise Busy(
                f"the server is busy: {self.pending} images are being decoded or waiting; "
                "send this one again in a few seconds",
                503,
                {"Retry-After": "2"},
            )
        self.pending += 1
        try:
            call = functools.partial(function, *args, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self._threads, call)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)


__all__ = ["DecodeQueue", "Busy", "default_max_pixels", "FLOOR_PIXELS", "MODEL_PIXELS_MULTIPLE"]
