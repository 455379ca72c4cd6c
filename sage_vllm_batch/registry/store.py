"""The on-disk store: root resolution, model ids, the ``metadata.json`` manifest and its locks.

Layout under the root::

    metadata.json                      manifest: every (model id, revision) that is present
    models/<org>--<name>/<revision>/   one Hugging Face folder per revision, side by side
    .tmp/                              staging dirs; renamed into ``models/`` when complete
    .locks/                            filelock files: one for the manifest, one per model

Invariants: a folder is renamed into ``models/`` and recorded in the manifest under the manifest
lock, so the manifest never names a half-written model. Staging, importing and deleting a model
happen under that model's lock; the lock order is always model lock, then manifest lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sage_vllm_batch.fsutil import fsync_dir
from sage_vllm_batch.registry.errors import InvalidModelIdError, ManifestError

ENV_ROOT = "SAGE_LLM_MODEL_ROOT"
DEFAULT_ROOT_NAME = "registry"
MANIFEST_NAME = "metadata.json"
MODELS_DIR = "models"
TMP_DIR = ".tmp"
LOCK_DIR = ".locks"
MANIFEST_FORMAT = 1
DEFAULT_REVISION_HUB = "main"
DEFAULT_REVISION_LOCAL = "local"

# Hub-style names: letters, digits, '.', '_', '-'; no '--' or '..' (as the Hub itself refuses), so the
# '<org>--<name>' folder name maps back to exactly one id and no part can climb out of the root.
_ID_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_HASH_CHUNK = 1 << 20


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The registry root: ``root`` if given, else ``$SAGE_LLM_MODEL_ROOT``, else ``./registry``.

    Args:
        root: Explicit root (the job config's ``registry.root``); wins over the environment.

    Returns:
        An absolute path (not created here: read-only commands work on a missing root).
    """
    chosen = root if root not in (None, "") else os.environ.get(ENV_ROOT) or Path.cwd() / DEFAULT_ROOT_NAME
    return Path(chosen).expanduser().absolute()


def validate_model_id(model_id: str) -> str:
    """Check ``model_id`` (``name`` or ``org/name``) and return it unchanged.

    Raises:
        InvalidModelIdError: empty parts, ``..``, ``--``, absolute paths, odd characters.
    """
    parts = model_id.split("/") if isinstance(model_id, str) else []
    ok = 1 <= len(parts) <= 2 and all(
        _ID_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts
    )
    if not ok:
        raise InvalidModelIdError(
            f"Invalid model id {model_id!r}: use 'name' or 'org/name' made of letters, digits, '.', '_' "
            "and '-' (no empty parts, '..', '--', spaces or absolute paths), e.g. "
            "'sentence-transformers/all-MiniLM-L6-v2'. List valid ids with `sage-vllm-models list`."
        )
    return model_id


def validate_revision(revision: str) -> str:
    """Check a revision name (it becomes a folder name) and return it unchanged.

    Raises:
        InvalidModelIdError: the revision has odd characters, ``/`` or ``..``.
    """
    if not isinstance(revision, str) or not _REVISION.fullmatch(revision) or ".." in revision:
        raise InvalidModelIdError(
            f"Invalid revision {revision!r}: use letters, digits, '.', '_', '+', '-' (a branch, tag, "
            "commit hash or version such as 'main' or '0.1.0'; no '/' or '..')."
        )
    return revision


def model_key(model_id: str) -> str:
    """Folder name of a model id: ``org/name`` -> ``org--name``."""
    return validate_model_id(model_id).replace("/", "--")


def model_rel_path(model_id: str, revision: str) -> str:
    """Path of a model revision relative to the root (POSIX separators, as stored in the manifest)."""
    return f"{MODELS_DIR}/{model_key(model_id)}/{validate_revision(revision)}"


def now_iso() -> str:
    """Current UTC time, ISO 8601 with microseconds (sorts like the instant it names)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``folder``, keyed by POSIX relative path."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        out[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": digest}
    return out


@dataclass(frozen=True)
class ModelRecord:
    """One (model id, revision) as recorded in the manifest."""

    model_id: str
    revision: str
    path: Path  # absolute
    rel_path: str
    source: dict[str, Any]
    size: int
    files: dict[str, dict[str, Any]] = field(repr=False)
    created_at: str
    last_used_at: str
    tags: dict[str, str]

    @property
    def type(self) -> str:
        """``text``, ``embedding`` or ``lora`` (an adapter: tags ``base_model``, ``base_revision``)."""
        return self.tags.get("type", "text")

    @property
    def present(self) -> bool:
        """Whether the folder is on disk (a crash between rename and manifest write can remove it)."""
        return self.path.is_dir()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``sage-vllm-models show`` and ``list --json`` print)."""
        return {
            "id": self.model_id,
            "revision": self.revision,
            "path": str(self.path),
            "type": self.type,
            "size": self.size,
            "source": self.source,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "tags": self.tags,
            "files": self.files,
        }


class Store:
    """A registry root on disk. Cheap to build; every method re-reads the manifest."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = resolve_root(root)
        self.manifest_path = self.root / MANIFEST_NAME
        self.tmp_dir = self.root / TMP_DIR
        self.lock_dir = self.root / LOCK_DIR

    # -- locks ---------------------------------------------------------------------------------
    def _lock(self, name: str) -> FileLock:
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        # Singleton per path: re-entrant within a thread, exclusive across threads and processes.
        return FileLock(self.lock_dir / f"{name}.lock", is_singleton=True)

    def manifest_lock(self) -> FileLock:
        """The lock serializing every read-modify-write of ``metadata.json``."""
        return self._lock("metadata.json")

    def model_lock(self, model_id: str) -> FileLock:
        """The per-model lock held while staging, importing or deleting any revision of ``model_id``."""
        return self._lock(model_key(model_id))

    # -- manifest ------------------------------------------------------------------------------
    def read(self) -> dict[str, Any]:
        """The manifest as a dict (an empty one if the root has none). Lock-free: writes are atomic."""
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format": MANIFEST_FORMAT, "models": {}}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(
                f"{self.manifest_path} is not valid JSON ({e}). Restore it from a backup, or move it away and "
                "re-import the models with `sage-vllm-models import ...`."
            ) from e
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise ManifestError(
                f"{self.manifest_path} has no 'models' mapping; it is not a registry manifest."
            )
        return data

    def _write(self, data: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{MANIFEST_NAME}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.manifest_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(self.root)

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the manifest under its lock; written back atomically on normal exit."""
        with self.manifest_lock():
            data = self.read()
            yield data
            data["format"] = MANIFEST_FORMAT
            self._write(data)

    # -- records -------------------------------------------------------------------------------
    def _record(self, model_id: str, revision: str, entry: dict[str, Any]) -> ModelRecord:
        rel = entry["path"]
        return ModelRecord(
            model_id=model_id,
            revision=revision,
            path=self.root / rel,
            rel_path=rel,
            source=dict(entry.get("source", {})),
            size=int(entry.get("size", 0)),
            files=dict(entry.get("files", {})),
            created_at=entry.get("created_at", ""),
            last_used_at=entry.get("last_used_at", entry.get("created_at", "")),
            tags=dict(entry.get("tags", {})),
        )

    def records(self, model_id: str | None = None) -> list[ModelRecord]:
        """All recorded revisions (of one model if ``model_id`` is given), sorted by id then revision."""
        models = self.read()["models"]
        ids = [model_id] if model_id is not None else sorted(models)
        return [
            self._record(mid, rev, entry) for mid in ids for rev, entry in sorted(models.get(mid, {}).items())
        ]

    def get(self, model_id: str, revision: str) -> ModelRecord | None:
        """The record of one revision, or None."""
        entry = self.read()["models"].get(model_id, {}).get(revision)
        return None if entry is None else self._record(model_id, revision, entry)

    def touch(self, model_id: str, revision: str) -> None:
        """Set the last-used time of one revision to now (no-op if it is not recorded)."""
        with self.edit() as data:
            entry = data["models"].get(model_id, {}).get(revision)
            if entry is not None:
                entry["last_used_at"] = now_iso()

    # -- staging -------------------------------------------------------------------------------
    def staging_dir(self, model_id: str, revision: str, kind: str) -> Path:
        """A fresh, empty staging dir under ``.tmp/`` (same filesystem, so the final rename is atomic)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        path = self.tmp_dir / f"{model_key(model_id)}@{revision}.{kind}-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def download_dir(self, model_id: str, revision: str) -> Path:
        """The fixed staging dir of a Hub download: kept across failures so the next attempt resumes."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self.tmp_dir / f"{model_key(model_id)}@{validate_revision(revision)}.download"

    def clean_stale(self, model_id: str) -> list[Path]:
        """Remove leftovers of crashed imports/deletes of ``model_id``. Caller holds the model lock.

        Download staging dirs are kept: they hold the files a resumed download reuses.
        """
        removed = []
        for path in self.tmp_dir.glob(f"{model_key(model_id)}@*"):
            if not path.name.endswith(".download"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def clean_all_stale(self) -> list[Path]:
        """Remove every temp dir whose model is not locked by a running job, and orphan manifest temps."""
        removed: list[Path] = []
        if self.tmp_dir.is_dir():
            for path in sorted(self.tmp_dir.iterdir()):
                lock = self._lock(path.name.split("@", 1)[0])
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    continue  # a live process is staging this model
                try:
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed.append(path)
                finally:
                    lock.release()
        with self.manifest_lock():
            for path in self.root.glob(f".{MANIFEST_NAME}.*.tmp"):
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed

    def _to_trash(self, folder: Path, model_id: str, revision: str) -> Path:
        trash = self.tmp_dir / f"{model_key(model_id)}@{revision}.trash-{uuid.uuid4().hex[:12]}"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        os.rename(folder, trash)
        return trash

    # -- commit / remove (caller holds the model lock) -----------------------------------------
    def commit(
        self,
        model_id: str,
        revision: str,
        staged: Path,
        *,
        source: dict[str, Any],
        tags: dict[str, str],
    ) -> ModelRecord:
        """Move a complete staging dir into place and record it; replaces a previous copy.

        The files are hashed before the manifest lock is taken, so other models are not held up.
        """
        files = hash_files(staged)
        rel = model_rel_path(model_id, revision)
        dest = self.root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        trash = None
        now = now_iso()
        with self.edit() as data:
            if dest.exists():  # an older copy, or an orphan left by a crash before its manifest write
                trash = self._to_trash(dest, model_id, revision)
            os.rename(staged, dest)
            fsync_dir(dest.parent)
            data["models"].setdefault(model_id, {})[revision] = {
                "path": rel,
                "source": source,
                "size": sum(f["size"] for f in files.values()),
                "files": files,
                "created_at": now,
                "last_used_at": now,
                "tags": tags,
            }
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        record = self.get(model_id, revision)
        assert record is not None
        return record

    def remove(self, model_id: str, revision: str) -> ModelRecord | None:
        """Unrecord one revision and delete its folder. Returns the removed record, if there was one."""
        trash = None
        with self.edit() as data:
            revisions = data["models"].get(model_id, {})
            entry = revisions.pop(revision, None)
            if not revisions:
                data["models"].pop(model_id, None)
            dest = self.root / model_rel_path(model_id, revision)
            if dest.exists():
                trash = self._to_trash(dest, model_id, revision)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):  # only succeeds once the last revision is gone
            dest.parent.rmdir()
        return None if entry is None else self._record(model_id, revision, entry)
