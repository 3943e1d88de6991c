"""Writers' hidden paths beside what they write, and clearing what killed writers left.

A writer of ``DIR/NAME`` stages its work at ``DIR/.NAME.KIND-HOST-PID-UUID`` (`beside`)
and renames it into place when complete; a writer killed first leaves that path
behind. A later writer removes such leftovers of dead processes of this host
(`clean_leftovers`, `left_by_dead_writer`), never those of a process still running
or of another host (whose pids mean nothing here). Used by `dask_em.io` (outputs,
model versions), `dask_em.ingest` (stores) and `dask_em.checkpoint` (its lock owner).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9_.]", "_", os.uname().nodename)
"""This host's name as it appears in staging paths (only ``[A-Za-z0-9_.]``)."""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def writer_tag() -> str:
    """``HOST-PID-UUID``: names this process's writing, unique per call."""
    return f"{HOST}-{os.getpid()}-{uuid.uuid4().hex}"


def beside(dest: Path, kind: str) -> Path:
    """A hidden path next to ``dest`` naming its writer: ``.NAME.KIND-HOST-PID-UUID``."""
    return dest.with_name(f".{dest.name}.{kind}-{writer_tag()}")


def left_by_dead_writer(name: str, dest_names: Sequence[str], kinds: Sequence[str]) -> str | None:
    """The KIND of ``name`` if it is a `beside` path of one of ``dest_names`` with one of
    ``kinds``, written by a process of this host that no longer runs; else None."""
    alternatives = "|".join(map(re.escape, dest_names))
    match = re.fullmatch(
        rf"\.(?:{alternatives})\.({'|'.join(map(re.escape, kinds))})"
        rf"-{re.escape(HOST)}-(\d+)-[0-9a-f]{{32}}",
        name,
    )
    if match is None or process_alive(int(match.group(2))):
        return None
    return match.group(1)


def clean_leftovers(
    dest: Path, kinds: Sequence[str], restorable: Callable[[Path], bool] = lambda _: True
) -> list[str]:
    """Remove what killed writers of ``dest`` left beside it; return what was done.

    A staging path of kind ``"old"`` (an earlier ``dest`` renamed aside by a writer
    killed before it put the new one in place) is renamed back to ``dest`` when ``dest``
    is missing and ``restorable(path)``; every other leftover is deleted.

    Parameters
    ----------
    dest : Path
        The destination.
    kinds : sequence of str
        The KINDs of `beside` paths its writers make (``"old"`` among them if they
        rename an earlier ``dest`` aside).
    restorable : callable, optional
        Whether an ``"old"`` leftover is a whole earlier ``dest`` worth putting back.

    Returns
    -------
    list of str
        One sentence per leftover restored or removed.
    """
    done: list[str] = []
    if not dest.parent.is_dir():
        return done
    for path in sorted(dest.parent.iterdir()):
        kind = left_by_dead_writer(path.name, [dest.name], kinds)
        if kind is None:
            continue
        if kind == "old" and not dest.exists() and restorable(path):
            os.replace(path, dest)
            done.append(f"restored the earlier {dest.name} from {path.name}")
        else:
            remove(path)
            done.append(f"removed {path.name}, left by a killed writer")
    return done


def remove(path: Path) -> None:
    """Delete the file or directory tree ``path`` if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
