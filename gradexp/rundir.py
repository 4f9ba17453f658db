"""The run folder: `<out>/<name>/<YYYYmmdd-HHMMSS>-<id>/`, created fresh, never overwritten."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from gradexp.config import ConfigError

STATUSES = ("completed", "diverged", "interrupted", "failed")  # every status a run ends with (summary.json)


def check_out(out: str | Path, name: str) -> Path:
    """The folder `<out>/<name>` that run folders go in, checked before anything runs: ConfigError when
    it would leave `out` (a symlink there pointing elsewhere), lies under a file, or cannot be created
    (a read-only file system, no permission)."""
    root = Path(out).resolve()
    parent = (root / name).resolve()
    if root != parent and root not in parent.parents:
        raise ConfigError(f"--out: {root / name} is a link to {parent}, outside {root}; a run folder is made "
                          f"only inside --out: remove the link or give another --out or name")
    existing = parent
    while not existing.exists():  # the deepest part of the path that is there already
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out: {existing} is a file, so {parent} cannot be made; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out: cannot create folders in {existing} (read-only or no permission); give a "
                          "writable folder")
    return parent


def new_run_dir(out: str | Path, name: str) -> Path:
    """Create a new, empty run folder. `name` is validated by the config and cannot leave `out`;
    a folder that cannot be made is a ConfigError (check_out says why)."""
    parent = check_out(out, name)
    for _ in range(10):
        path = parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
        except OSError as e:  # what os.access does not see: /proc, a full disk, root on a read-only mount
            raise ConfigError(f"--out: cannot create {path} ({e.strerror}); give a writable folder") from None
    raise FileExistsError(f"could not create a new run folder under {parent}")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def folder_name(text: str) -> str:
    """`text` as one folder name (a sweep's point, a layer's sub-run; a user's names may hold anything),
    also valid as a config name but for its length: ASCII letters, digits, '.', '_' and '-', starting
    with a letter or digit (never hidden, never '..'); each run of other characters becomes '-'. ASCII,
    so a cut at n characters is n bytes (a file system allows 255 in a name)."""
    return _UNSAFE.sub("-", text).lstrip("._-") or "x"


def start_stamp(folder: Path) -> str:
    """When a run started, from its folder's name, as TensorBoard shows it: "12-01 19:30:05"."""
    d, t = folder.name.split("-")[:2]
    return f"{d[4:6]}-{d[6:]} {t[:2]}:{t[2:4]}:{t[4:]}"


def jsonable(obj: Any) -> Any:
    """Non-finite floats become null (strict JSON); tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


class WriteError(OSError):
    """A file of the run could not be written (a full disk): its message says which, in words,
    e.g. "no space left on device while writing <path>"."""

    def __str__(self) -> str:
        return f"{self.strerror[:1].lower()}{self.strerror[1:]} while writing {self.filename}"


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """An OSError inside (a write to a full disk names no file) becomes a WriteError naming `path`."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.errno, e.strerror or str(e), str(path)) from e


def in_words(e: BaseException) -> str:
    """An error as summary.json and the terminal give it: a file that could not be written says so."""
    return str(e) if isinstance(e, WriteError) else f"{type(e).__name__}: {e}"


# Creating a file: never through a symbolic link someone planted under the name (a shared folder's
# summary.json, gradient_flow.png, sweep.lock): O_NOFOLLOW refuses one, O_EXCL one planted since
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


def replace_file(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` into a new temporary file beside `path`, then rename it to `path`: a reader never
    sees half a file, a write that fails (a full disk, Ctrl-C) leaves no temporary file, and a link
    planted at `path` is replaced, not written through (the rename replaces the link itself)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path):
            tmp.unlink(missing_ok=True)  # a leftover, or a planted link: removed, its target untouched
            with os.fdopen(os.open(tmp, NEW_FILE, 0o644), "wb") as f:
                write(f)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, text: str) -> None:
    """`text` (UTF-8) into `path` by replace_file."""
    replace_file(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
