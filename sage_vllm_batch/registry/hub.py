"""Hub downloads with ``huggingface_hub.snapshot_download``, checked against the Hub's checksums.

huggingface_hub is imported inside the functions: ``sage-vllm-models --help`` and offline jobs never
pay for it. The endpoint (``HF_ENDPOINT``) and offline mode (``HF_HUB_OFFLINE``) are read from the
environment at call time, so they work even when set after huggingface_hub was first imported.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from sage_vllm_batch.registry.errors import (
    DownloadError,
    HubUnavailableError,
    ModelNotFoundError,
    VerificationError,
    fetch_hint,
)

# Seconds to wait for the Hub's first answer: a missing network must fail in seconds, not minutes.
CONNECT_TIMEOUT_S = 10.0
# Files downloaded at once; the local dir mode of huggingface_hub writes each file atomically.
MAX_WORKERS = 4


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline() -> bool:
    """Whether Hub access is disabled (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read now)."""
    if _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return constants.is_offline_mode()


def hub_endpoint() -> str:
    """The Hub URL: ``HF_ENDPOINT`` read now, else huggingface_hub's configured endpoint."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub's HTTP client changed across major versions (requests, httpx, httpx2);
    # catch the transport errors of whichever is installed.
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _quiet_tqdm() -> type:
    from huggingface_hub.utils import tqdm as hf_tqdm

    class QuietTqdm(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


def resolve_commit(model_id: str, revision: str) -> tuple[str, str]:
    """Ask the Hub which commit ``revision`` of ``model_id`` points at.

    Returns:
        ``(commit sha, endpoint)``.

    Raises:
        HubUnavailableError: offline mode, no network, or a Hub error.
        ModelNotFoundError: the repository or revision does not exist (or is gated/private).
    """
    endpoint = hub_endpoint()
    if is_offline():
        raise HubUnavailableError(
            f"Model {model_id!r} (revision {revision!r}) is not in the registry and Hub access is disabled "
            f"(HF_HUB_OFFLINE is set). {fetch_hint(model_id)}"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint).model_info(model_id, revision=revision, timeout=CONNECT_TIMEOUT_S)
    except RevisionNotFoundError as e:
        raise ModelNotFoundError(
            f"Revision {revision!r} of {model_id!r} does not exist on the Hub ({endpoint}). "
            f"Check the name, or run `sage-vllm-models download {model_id}` for the default branch."
        ) from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelNotFoundError(
            f"Model {model_id!r} was not found on the Hub ({endpoint}), or it is private/gated (set HF_TOKEN). "
            f"{fetch_hint(model_id)}"
        ) from e
    except _transport_errors() as e:
        raise HubUnavailableError(
            f"Model {model_id!r} (revision {revision!r}) is not in the registry and the Hub at {endpoint} "
            f"cannot be reached ({type(e).__name__}: {e}). {fetch_hint(model_id)}"
        ) from e
    if not info.sha:
        raise DownloadError(f"The Hub at {endpoint} returned no commit for {model_id!r}@{revision}.")
    return info.sha, endpoint


def download_snapshot(
    model_id: str, revision: str, staging: Path, *, progress: bool = True
) -> dict[str, Any]:
    """Download ``model_id`` at ``revision`` into ``staging`` and check every file against the Hub.

    ``staging`` is reused across attempts: files completed by an interrupted attempt are kept by
    huggingface_hub's local-dir metadata and not fetched again.

    Returns:
        The manifest's ``source`` record (kind, spec, origin, revision, commit, endpoint).

    Raises:
        HubUnavailableError / ModelNotFoundError: see :func:`resolve_commit`.
        DownloadError: the transfer failed part-way (staging kept, so a retry resumes).
        VerificationError: a file's sha256 or git hash differs from the Hub's (staging removed).
    """
    commit, endpoint = resolve_commit(model_id, revision)
    from huggingface_hub import HfApi, snapshot_download

    staging.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(
            model_id,
            # A commit hash pins every file to one snapshot even if the branch moves meanwhile.
            revision=commit,
            local_dir=staging,
            # Inside the staging dir: the registry stays self-contained and leaves ~/.cache alone.
            cache_dir=staging / ".cache" / "huggingface" / "hub-cache",
            endpoint=endpoint,
            etag_timeout=CONNECT_TIMEOUT_S,
            max_workers=MAX_WORKERS,
            tqdm_class=None if progress else _quiet_tqdm(),
        )
        report = HfApi(endpoint=endpoint).verify_repo_checksums(model_id, revision=commit, local_dir=staging)
    except _transport_errors() as e:
        raise DownloadError(
            f"Downloading {model_id!r}@{revision} from {endpoint} failed: {type(e).__name__}: {e}. Nothing was "
            f"recorded; run `sage-vllm-models download {model_id} --revision {revision}` again to resume."
        ) from e
    problems = [
        f"{m['path']} ({m['algorithm']} {m['actual'][:12]} != {m['expected'][:12]})"
        for m in report.mismatches
    ]
    problems += [f"{p} (missing)" for p in report.missing_paths]
    if problems:
        shutil.rmtree(staging, ignore_errors=True)  # a corrupt file would be reused by a resume
        raise VerificationError(
            f"Download of {model_id!r}@{revision} (commit {commit}) does not match the Hub's checksums: "
            f"{', '.join(problems)}. Nothing was recorded; retry with `sage-vllm-models download {model_id} "
            f"--revision {revision}`."
        )
    shutil.rmtree(staging / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping, not model files
    return {
        "kind": "hub",
        "spec": "hub",
        "origin": model_id,
        "revision": revision,
        "commit": commit,
        "endpoint": endpoint,
    }
