"""Run directories on local disk or on Cloud Storage (``gs://bucket/...``).

On a TPU pod the run directory must outlive the VMs (preemption re-creates them), so it is usually a
``gs://`` URL. Orbax writes checkpoints there directly. Everything else a run writes (tokenizer and model
config through Hugging Face's ``save_pretrained``, metrics, plots) is written by libraries that need a
local path, so it goes to a local mirror that :meth:`RunDir.push` copies to the bucket; a resumed run
first :meth:`RunDir.pull`\\ s it back. For a local run directory the mirror *is* the directory and both
are no-ops. GCS access goes through ``etils.epath`` (install ``gcsfs``, part of the ``tpu`` extra).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path

from etils import epath

from icot_jax.errors import MissingPathError

MIRRORED_SKIP = ("checkpoints", "best", "lock")
"""Top-level entries never mirrored: the folders that orbax writes to the run directory itself, and the
lock of ``icot_jax.loop.lock`` (it belongs to one machine's file system)."""


def is_remote(path: str | Path) -> bool:
    """True for URLs such as ``gs://bucket/run`` (anything with a ``scheme://``)."""
    return "://" in str(path)


class RunDir:
    """A run directory: ``url`` (where it lives) and ``local`` (where libraries write; the same if local).

    ``mirror_root`` forces a local mirror even for a local ``url`` (tests use it to exercise the
    remote code path on disk).
    """

    def __init__(self, url: str | Path, *, mirror_root: str | Path | None = None):
        self.url = str(url)
        self._pushed: dict[Path, tuple[int, int]] = {}
        if is_remote(url) or mirror_root is not None:
            root = Path(mirror_root or Path(tempfile.gettempdir()) / "icot-run-mirrors")
            digest = hashlib.sha1(self.url.encode()).hexdigest()[:12]
            self.local = root / f"{Path(self.url.rstrip('/')).name}-{digest}"
        else:
            self.local = Path(url)

    @property
    def mirrored(self) -> bool:
        """The local folder is a copy of the run directory, kept in step by ``push``/``pull``."""
        return self.local != Path(self.url)

    def path(self, name: str) -> str:
        """``url/name`` as a string (for orbax, which accepts both local paths and URLs)."""
        return f"{self.url.rstrip('/')}/{name}"

    def _files(self, root: epath.Path, relative: Path = Path(), names: Collection[str] | None = None):
        """``(relative path, file)`` under ``root``, :data:`MIRRORED_SKIP` skipped, and at the top only
        ``names`` if given (one listing per folder: epath refuses recursive globs on GCS)."""
        for entry in root.iterdir():
            if relative == Path() and (entry.name in MIRRORED_SKIP or (names is not None and entry.name not in names)):
                continue
            if entry.is_dir():
                yield from self._files(entry, relative / entry.name)
            else:
                yield relative / entry.name, entry

    def push(self) -> None:
        """Copy local files created or changed since the last push to the run directory."""
        if not self.mirrored:
            return
        remote = epath.Path(self.url)
        for relative, file in self._files(epath.Path(self.local)):
            stat = file.stat()
            version = (stat.mtime, stat.length)
            if self._pushed.get(relative) != version:
                target = remote / str(relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(file.read_bytes())
                self._pushed[relative] = version

    def remove_remote(self, name: str) -> None:
        """Delete ``url/name`` (file or folder) of a mirrored run directory, for a part the local mirror
        rewrites whole: :meth:`push` only adds and replaces files, so the old ones would stay beside the new."""
        if not self.mirrored:
            return
        target = epath.Path(self.path(name))
        if target.is_dir():
            target.rmtree()
        elif target.exists():
            target.unlink()
        self._pushed = {path: version for path, version in self._pushed.items() if path.parts[:1] != (name,)}

    def pull(self, names: Collection[str] | None = None) -> None:
        """Copy the run directory's files (checkpoint folders excluded) into the local mirror; with
        ``names``, only those top-level files and folders (e.g. what opening a finished run reads)."""
        if not self.mirrored:
            return
        remote = epath.Path(self.url)
        if not remote.exists():
            raise MissingPathError(f"{self.url}: run directory not found")
        for relative, file in self._files(remote, names=names):
            target = self.local / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(file.read_bytes())


class NewRunFiles:
    """What a new run adds to its (local) run directory, so that a run whose setup fails leaves nothing.

    Records the folders that do not exist yet and the entries already in ``folder``; :meth:`discard`
    removes every entry added since, then the folders it created (parents only while empty, since
    another run may have started beside it).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        missing, parent = [], self.folder
        while not parent.exists() and parent != parent.parent:
            missing.append(parent)
            parent = parent.parent
        self._created = missing  # innermost first
        self._existing = set(os.listdir(self.folder)) if self.folder.is_dir() else set()

    def create(self) -> None:
        """Create the folder (and its parents)."""
        self.folder.mkdir(parents=True, exist_ok=True)

    def discard(self) -> None:
        """Remove what was added since construction."""
        if not self.folder.is_dir():
            return
        for name in set(os.listdir(self.folder)) - self._existing:
            path = self.folder / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # not empty: someone else's files
                return
