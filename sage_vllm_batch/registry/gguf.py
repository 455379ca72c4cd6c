"""GGUF causal LM -> dequantized Hugging Face folder that vLLM and transformers load as is.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=NAME)``) and dequantizes it, but
three things have to be fixed on the way to a folder that behaves like the original model:

* A GGUF-loaded model refuses ``save_pretrained`` (it counts as "quantized"): the weights are moved
  into a plain model built from the same config, in the requested dtype, and that is saved.
* The special tokens (bos / eos / pad / unk) and the chat template are taken from the GGUF metadata
  and written explicitly into ``config.json``, ``generation_config.json`` and the tokenizer files.
  For a ChatML template the end-of-turn token (``<|im_end|>``) must be the eos, or generation never
  stops.
* transformers only knows some of llama.cpp's pre-tokenizers (``tokenizer.ggml.pre``). SmolLM2's
  ("smollm") splits every digit on its own before the GPT-2 regex; the tokenizer gets a
  ``Digits(individual) + ByteLevel`` pre-tokenizer and a ``ByteLevel`` decoder, so encoding matches
  the model's training and ``decode(encode(s)) == s``.

The GGUF metadata is read here with a small reader of our own (scalars and the token list only), so
nothing depends on private transformers helpers. Heavy imports (torch, transformers) happen inside
``convert_gguf_to_hf``.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO

from sage_vllm_batch.registry.errors import InvalidSourceError

logger = logging.getLogger(__name__)

_DTYPES = ("bfloat16", "float16", "float32")

# llama.cpp pre-tokenizers (``tokenizer.ggml.pre``) that split "each digit alone, then GPT-2's
# regex" (llama-vocab.cpp groups these). transformers leaves them at plain GPT-2, which merges digit
# runs the model never saw during training.
_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)

# Strings that must survive encode -> decode unchanged; checked on the written folder.
_ROUND_TRIP_PROBE = (
    "Hello world! 12345 + 0.5\n\n  two  spaces\tand a tab: héllo 日本語 🙂\ndef f(x):\n    return x**2"
)

# ---------------------------------------------------------------------------------------------
# Minimal GGUF metadata reader (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)
# ---------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
# value type -> struct format (little endian) for fixed-size scalars
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
# arrays kept in full; every other array is replaced by its length (merges, scores, token types...)
_KEEP_ARRAYS = frozenset({"tokenizer.ggml.tokens"})


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise EOFError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_str(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    return f.read(n).decode("utf-8", errors="replace")


def _read_value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALAR_FORMATS:
        return _read(f, _SCALAR_FORMATS[vtype])
    if vtype == _STRING:
        return _read_str(f)
    if vtype == _ARRAY:
        etype, count = _read(f, "<I"), _read(f, "<Q")
        if etype in _SCALAR_FORMATS and not keep:  # skip fixed-size arrays without decoding them
            f.seek(struct.calcsize(_SCALAR_FORMATS[etype]) * count, 1)
            return count
        if etype == _STRING and not keep:  # skip each string by its length
            for _ in range(count):
                f.seek(_read(f, "<Q"), 1)
            return count
        items = [_read_value(f, etype, keep) for _ in range(count)]
        return items if keep else count
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_metadata(gguf_file: Path) -> dict[str, Any]:
    """The GGUF key/value metadata: scalars and strings as values, arrays as their length (except
    ``tokenizer.ggml.tokens``, kept as the list of token strings)."""
    with open(gguf_file, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise InvalidSourceError(f"{gguf_file} is not a GGUF file (bad magic bytes).")
        version = _read(f, "<I")
        if version < 2:
            raise InvalidSourceError(
                f"{gguf_file} is GGUF version {version}; only versions 2 and 3 are supported."
            )
        _read(f, "<Q")  # tensor count
        n_kv = _read(f, "<Q")
        meta: dict[str, Any] = {"GGUF.version": version}
        for _ in range(n_kv):
            key = _read_str(f)
            meta[key] = _read_value(f, _read(f, "<I"), keep=key in _KEEP_ARRAYS)
    return meta


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


class _Special:
    """The special tokens named by the GGUF metadata, as ``(token string, id)`` pairs."""

    def __init__(self, meta: dict[str, Any], gguf_file: Path) -> None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise InvalidSourceError(f"{gguf_file} has no tokenizer.ggml.tokens; cannot build a tokenizer.")
        self.tokens: list[str] = tokens

        def token(key: str) -> tuple[str, int] | None:
            idx = meta.get(f"tokenizer.ggml.{key}")
            if isinstance(idx, int) and 0 <= idx < len(tokens):
                return tokens[idx], idx
            return None

        self.bos, self.eos, self.unk, self.pad = (
            token("bos_token_id"),
            token("eos_token_id"),
            token("unknown_token_id"),
            token("padding_token_id"),
        )
        self.eot = token("eot_token_id")
        template = meta.get("tokenizer.chat_template")
        self.chat_template: str | None = template if isinstance(template, str) and template else None
        # A ChatML template closes every turn with <|im_end|>: that token has to stop generation.
        # Some converters (and some transformers versions) name another token as eos; fix it here.
        file_eos = self.eos
        if self.chat_template and "<|im_end|>" in self.chat_template and "<|im_end|>" in tokens:
            im_end = ("<|im_end|>", tokens.index("<|im_end|>"))
            if self.eos != im_end:
                logger.warning(
                    "GGUF eos is %r but the ChatML template ends turns with <|im_end|>: using <|im_end|>",
                    self.eos,
                )
                self.eos = im_end
        if self.eos is None:
            raise InvalidSourceError(
                f"{gguf_file} names no eos token (tokenizer.ggml.eos_token_id); generation could not stop."
            )
        # every token that ends generation: eos first, then the file's own eos / end-of-turn if different
        self.stop_ids = list(dict.fromkeys(t[1] for t in (self.eos, file_eos, self.eot) if t is not None))

    def special_tokens_map(self) -> dict[str, str]:
        names = {
            "bos_token": self.bos,
            "eos_token": self.eos,
            "unk_token": self.unk,
            "pad_token": self.pad or self.eos,
        }
        return {name: tok[0] for name, tok in names.items() if tok is not None}


def convert_gguf_to_hf(gguf_file: Path, out_dir: Path, *, dtype: str = "bfloat16") -> None:
    """Dequantize a GGUF causal-LM checkpoint into a complete Hugging Face folder in out_dir (exists, empty).

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (in ``dtype``),
    ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template), ``chat_template.jinja``
    and ``special_tokens_map.json``. Writes nothing outside ``out_dir``; a failure leaves it partly
    written (callers stage into a temporary dir and rename it when this returns).

    Raises:
        InvalidSourceError: the file is not a GGUF causal LM transformers can read, or the folder
            written fails its self-check (eos token, tokenizer round trip).
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, not {dtype!r}")
    if not gguf_file.is_file():
        raise InvalidSourceError(f"GGUF file {gguf_file} does not exist.")
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; convert_gguf_to_hf writes into an empty dir.")

    t0 = time.perf_counter()
    meta = read_gguf_metadata(gguf_file)
    arch = meta.get("general.architecture", "?")
    special = _Special(meta, gguf_file)
    logger.info(
        "GGUF %s: architecture=%s, %s tokens, pre-tokenizer=%s, bos=%s eos=%s pad=%s, chat template: %s",
        gguf_file.name,
        arch,
        len(special.tokens),
        meta.get("tokenizer.ggml.pre"),
        special.bos,
        special.eos,
        special.pad,
        "yes" if special.chat_template else "no",
    )

    _convert_model(gguf_file, out_dir, dtype, special)
    logger.info("model written (%.1f s)", time.perf_counter() - t0)
    _convert_tokenizer(gguf_file, out_dir, special, meta)
    _self_check(out_dir, special, digits=meta.get("tokenizer.ggml.pre") in _DIGITS_THEN_GPT2)
    logger.info("converted %s -> %s in %.1f s", gguf_file.name, out_dir, time.perf_counter() - t0)


def _load_dequantized(gguf_file: Path):
    """The GGUF model as a dense float32 transformers model (weights dequantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.x keeps GGUF blocks packed when the `kernels` package is installed: ask for dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    try:
        return AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, low_cpu_mem_usage=True, **kwargs
        )
    except (ValueError, KeyError, NotImplementedError) as e:
        raise InvalidSourceError(f"transformers cannot load {gguf_file} as a causal LM: {e}") from e


def _convert_model(gguf_file: Path, out_dir: Path, dtype: str, special: _Special) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    t0 = time.perf_counter()
    logger.info("loading and dequantizing %s with transformers ...", gguf_file.name)
    src = _load_dequantized(gguf_file)
    logger.info(
        "dequantized %s (%s) in %.1f s", type(src).__name__, src.config.model_type, time.perf_counter() - t0
    )

    config = src.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = ""
    torch_dtype = getattr(torch, dtype)
    config.dtype = torch_dtype  # written as "dtype" by transformers 5, "torch_dtype" by 4.x
    if special.bos:
        config.bos_token_id = special.bos[1]
    config.eos_token_id = special.stop_ids[0] if len(special.stop_ids) == 1 else list(special.stop_ids)
    config.pad_token_id = (special.pad or special.eos)[1]

    # Tied tensors (lm_head = embed_tokens) share storage: cast each storage once and keep the sharing.
    state: dict[str, torch.Tensor] = {}
    cast: dict[int, torch.Tensor] = {}
    for name, tensor in src.state_dict().items():
        key = tensor.data_ptr()
        if key not in cast:
            cast[key] = tensor.detach().to(torch_dtype).contiguous()
        state[name] = cast[key]
    del src, cast

    # A plain model of the same class, built on the meta device (no random init), then given the weights.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.state_dict().items() if p.is_meta]
    if unexpected or still_meta:
        raise InvalidSourceError(
            f"Converting {gguf_file}: weights do not fit {type(model).__name__} "
            f"(unexpected {unexpected[:5]}, missing {still_meta[:5] or missing[:5]})."
        )
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=special.bos[1] if special.bos else None,
        eos_token_id=special.stop_ids[0] if len(special.stop_ids) == 1 else list(special.stop_ids),
        pad_token_id=(special.pad or special.eos)[1],
    )
    t1 = time.perf_counter()
    model.save_pretrained(out_dir, safe_serialization=True)
    del model, state
    logger.info("saved %s weights in %.1f s", dtype, time.perf_counter() - t1)

    # Readers of either transformers generation find the dtype; the architectures list names the class vLLM runs.
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = dtype
    cfg["dtype"] = dtype
    for key in ("_name_or_path", "_model_name_or_path", "quantization_config"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _convert_tokenizer(gguf_file: Path, out_dir: Path, special: _Special, meta: dict[str, Any]) -> None:
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    backend = tok.backend_tokenizer
    byte_level = meta.get("tokenizer.ggml.model") == "gpt2"
    pre = meta.get("tokenizer.ggml.pre")
    if byte_level and pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
        logger.info("pre-tokenizer %r: Digits(individual) + ByteLevel", pre)
    elif byte_level and pre not in (None, "default", "gpt-2", "gpt2"):
        logger.info("pre-tokenizer %r: kept as transformers built it", pre)
    if byte_level:
        backend.decoder = decoders.ByteLevel()
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and special.bos is not None
    if add_bos:
        bos = special.bos[0]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[special.bos]
        )
    tok.save_pretrained(out_dir)

    # tokenizer_config.json: the special tokens, the chat template and the flags, written explicitly.
    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    for key in ("is_local", "local_files_only", "name_or_path", "_commit_hash", "gguf_file"):
        tc.pop(key, None)
    tc.update(special.special_tokens_map())
    # The generic class loads tokenizer.json as written, in transformers 4.x and 5.x. A model-specific
    # class does not: transformers 5's GPT2Tokenizer rebuilds a plain ByteLevel pre-tokenizer on load,
    # dropping the Digits split.
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["add_bos_token"] = add_bos
    tc["add_eos_token"] = False
    tc["add_prefix_space"] = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    tc["clean_up_tokenization_spaces"] = False  # True would turn "a , b" into "a, b" on decode
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    if isinstance(context, int) and context > 0:
        tc["model_max_length"] = context
    if special.chat_template:
        tc["chat_template"] = special.chat_template
        (out_dir / "chat_template.jinja").write_text(special.chat_template)
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(special.special_tokens_map(), indent=2, ensure_ascii=False) + "\n"
    )
    logger.info("tokenizer written (%.1f s)", time.perf_counter() - t0)


def _self_check(out_dir: Path, special: _Special, *, digits: bool) -> None:
    """Reload the tokenizer from ``out_dir``: eos, pre-tokenizer, and a round trip of digits, spaces, unicode, code."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    problems = []
    if tok.eos_token_id != special.eos[1]:
        problems.append(f"eos is {tok.eos_token!r} (id {tok.eos_token_id}), expected {special.eos}")
    decoded = tok.decode(tok.encode(_ROUND_TRIP_PROBE, add_special_tokens=False))
    if decoded != _ROUND_TRIP_PROBE:
        problems.append(f"decode(encode(s)) != s: {decoded!r}")
    if digits and "Digits" not in str(tok.backend_tokenizer.pre_tokenizer):
        problems.append(f"the Digits pre-tokenizer was lost on reload: {tok.backend_tokenizer.pre_tokenizer}")
    if special.chat_template and not tok.chat_template:
        problems.append("the chat template was lost")
    missing = [
        n
        for n in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
        if not (out_dir / n).is_file()
    ]
    if missing:
        problems.append(f"missing files {missing}")
    if problems:
        raise InvalidSourceError(
            f"The Hugging Face folder converted into {out_dir} fails its self-check: " + "; ".join(problems)
        )
