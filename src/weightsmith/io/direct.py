"""A file written past the page cache: aligned blocks sent to disk on a second thread.

Writing through the page cache first copies every byte into newly allocated cache pages, which
on a virtual machine can cost a host fault per page, and leaves the disk idle until the final
fsync. Here data is copied into one of four aligned 4 MB blocks; a full block goes to the disk
with ``O_DIRECT`` on a second thread while the next ones fill, so producing the data and
writing it overlap (three blocks in flight keep the disk busy while the next tensor is being
computed), and the closing fsync has nothing left to wait for but the disk's cache.
Writes may go back over what was written (a header patched once the checksums are known).

Where ``O_DIRECT`` is refused (tmpfs, some network filesystems) the file is written through
the page cache instead, with the same results.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["DirectFile", "BLOCK", "BLOCKS"]

BLOCK = 4 << 20  # bytes per block
BLOCKS = 4  # blocks held: one filling while the others are written
_ALIGN = 4096  # offsets, lengths and addresses of direct writes are multiples of this


class DirectFile(io.RawIOBase):
    """A new file (``path`` must not exist) for writing, as a binary file object.

    Supports ``write``, ``seek``/``tell`` (writing over earlier bytes; not past the end),
    ``flush`` (everything written so far is in the file, at its exact size), ``fileno`` and
    ``name``. ``close`` flushes.
    """

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self.name = str(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self._direct = hasattr(os, "O_DIRECT")
        try:
            self._fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o666)  # less the umask, as open() does
        except OSError as e:
            if e.errno != errno.EINVAL or not self._direct:
                raise
            self._direct = False  # refused at open (tmpfs): through the page cache
            self._fd = os.open(path, flags, 0o666)
        self._blocks = [mmap.mmap(-1, BLOCK) for _ in range(BLOCKS)]  # page-aligned anonymous memory
        self._pending: list[Future[None] | None] = [None] * BLOCKS
        self._current = 0
        self._start = 0  # file offset of the current block
        self._fill = 0  # bytes of the current block holding data
        self._pos = 0
        self._patches: list[tuple[int, bytes]] = []  # writes over bytes already sent to disk
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsmith-write")
        self._switch = threading.Lock()

    # -- the file interface --------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        end = self._start + self._fill
        target = {os.SEEK_SET: offset, os.SEEK_CUR: self._pos + offset, os.SEEK_END: end + offset}[whence]
        if not 0 <= target <= end:
            raise OSError(errno.EINVAL, f"{self.name}: cannot seek to {target} (the file holds {end} bytes)")
        self._pos = target
        return target

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        end = self._start + self._fill
        if self._pos < end:  # over earlier bytes: in the current block, or patched in at flush
            over = min(n, end - self._pos)
            self._overwrite(self._pos, view[:over])
            self._pos += over
            view = view[over:]
        while view.nbytes:
            room = BLOCK - self._fill
            take = min(room, view.nbytes)
            self._blocks[self._current][self._fill:self._fill + take] = view[:take]
            self._fill += take
            self._pos += take
            view = view[take:]
            if self._fill == BLOCK:
                self._send()
        return n

    def flush(self) -> None:
        """Put everything written so far into the file, at its exact size (not yet durable: fsync)."""
        if self.closed:
            return
        if self._fill:  # the partial block, padded to the alignment, then the file cut to size
            padded = -(-self._fill // _ALIGN) * _ALIGN
            self._wait(self._current)
            self._pwrite(memoryview(self._blocks[self._current])[:padded], self._start)
        for i in range(BLOCKS):
            self._wait(i)
        os.ftruncate(self._fd, self._start + self._fill)
        if self._patches:
            fd = os.open(self.name, os.O_WRONLY)  # through the page cache: small, unaligned writes
            try:
                for offset, data in self._patches:
                    os.pwrite(fd, data, offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._patches.clear()

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()  # flushes, then marks the file closed even if flushing failed
        finally:
            self._pool.shutdown(wait=True)
            os.close(self._fd)
            self._blocks = []  # freed with the last view of them (a traceback may still hold one)

    # -- blocks --------------------------------------------------------------------------------
    def _overwrite(self, offset: int, view: memoryview) -> None:
        cut = max(offset, self._start)
        if cut < offset + view.nbytes:  # the part inside the block still being filled
            inside = view[cut - offset:]
            self._blocks[self._current][cut - self._start:cut - self._start + inside.nbytes] = inside
            view = view[:cut - offset]
        if view.nbytes:
            self._patches.append((offset, bytes(view)))

    def _send(self) -> None:
        """Hand the full current block to the writing thread and start filling the next one."""
        block, offset = self._current, self._start
        self._pending[block] = self._pool.submit(self._pwrite, memoryview(self._blocks[block]), offset)
        self._current = (block + 1) % BLOCKS
        self._start += BLOCK
        self._fill = 0
        self._wait(self._current)  # its previous write must be done before it is filled again

    def _wait(self, block: int) -> None:
        future = self._pending[block]
        if future is not None:
            self._pending[block] = None
            future.result()  # a failed write raises here

    def _pwrite(self, view: memoryview, offset: int) -> None:
        while view.nbytes:
            direct = self._direct  # the mode this attempt is made in (two threads write)
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not direct:
                    raise
                self._buffered()  # the filesystem takes no direct writes: go through the page cache
                continue
            view, offset = view[n:], offset + n

    def _buffered(self) -> None:
        import fcntl  # only reached where O_DIRECT exists (Linux); not importable on Windows

        with self._switch:
            if self._direct:
                flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
                fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                self._direct = False
