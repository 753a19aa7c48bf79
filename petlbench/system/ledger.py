"""A results folder's ledger: the rows petlbench wrote there, one JSON line each, so that reading a folder of
thousands of result files costs one read instead of thousands of parquet footers.

`results.write_result` appends a line after each result file is renamed into place: the file's name, its
fingerprint (size, modification time and a hash of its last 16 KiB) and the row it wrote. A reader takes a row
from the ledger only when the file is still there with the same fingerprint and the row passes the same
column-type check a file does; any other file (replaced, rewritten, copied in without its times, written by an
older petlbench, or a ledger line that is damaged) is read from its parquet file. The result files stay the
record: deleting the ledger only makes reading slower. Readers never write it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Final

LEDGER_NAME: Final = ".rows.jsonl"
_TAIL: Final = 16 * 1024
MAX_LEDGER_BYTES: Final = 1 << 30  # a larger ledger is not read (the files are)
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)


def fingerprint(path: Path) -> str | None:
    """'size:modification time (ns):hash of the last 16 KiB' of a file; None when it cannot be read. A file
    rewritten in place, replaced or copied without its times kept gets another fingerprint."""
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            handle.seek(max(0, info.st_size - _TAIL))
            tail = handle.read(_TAIL)
    except OSError:
        return None
    return f"{info.st_size}:{info.st_mtime_ns}:{hashlib.blake2b(tail, digest_size=16).hexdigest()}"


def record(path: Path, row: dict[str, Any]) -> None:
    """Append the row just written to `path` to its folder's ledger (never through a link). A ledger that cannot be
    written is left as it is: it only makes reading faster."""
    mark = fingerprint(path)
    if mark is None:
        return
    line = json.dumps({"file": path.name, "fingerprint": mark, "row": row}, separators=(",", ":")) + "\n"
    with contextlib.suppress(OSError, TypeError, ValueError):
        fd = os.open(path.parent / LEDGER_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)


def entries(folder: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """File name → (fingerprint, row) of the last line the ledger of `folder` holds for it ({} without a usable
    ledger; damaged lines are skipped)."""
    path = folder / LEDGER_NAME
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_LEDGER_BYTES:
            return {}
        data = path.read_bytes()
    except OSError:
        return {}
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for line in data.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if not isinstance(item, dict):
            continue
        name, mark, row = item.get("file"), item.get("fingerprint"), item.get("row")
        if isinstance(name, str) and isinstance(mark, str) and isinstance(row, dict):
            found[name] = (mark, row)
    return found
