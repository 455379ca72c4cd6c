"""engine.block_size: the auto choice (a pure function), validation, engine kwargs, and that the
key changes neither run dirs nor manifests (an output dir written before it existed resumes)."""

from __future__ import annotations

import pytest
from helpers import compose_job
from omegaconf import OmegaConf

from sage_vllm_batch.config import block_size as bs
from sage_vllm_batch.config import validate
from sage_vllm_batch.config.block_size import auto_block_size, job_block_size
from sage_vllm_batch.config.schema import ROW_NEUTRAL_KEYS, run_dir_excluded_keys
from sage_vllm_batch.engine.engine import engine_kwargs
from sage_vllm_batch.errors import ConfigError
from sage_vllm_batch.outputs.manifest import build_manifest, diff

CHAT = ("task=chat", "model=smollm2-135m-instruct")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "sharers,cpu,want",
    [(1, True, None), (2, True, 32), (3, True, 32), (1, False, None), (3, False, None)],
)
def test_auto_picks_small_blocks_only_where_streams_share_prefixes_on_the_cpu(sharers, cpu, want):
    assert auto_block_size(sharers=sharers, cpu=cpu) == want


@pytest.mark.timeout(30)
def test_a_set_block_size_wins_and_extra_is_left_to_pass_through():
    assert job_block_size({"block_size": 64}, sharers=3, cpu=True) == 64
    assert job_block_size({"block_size": None, "extra": {"block_size": 128}}, sharers=3, cpu=True) is None
    assert job_block_size({"block_size": None, "extra": {}}, sharers=3, cpu=True) == 32


@pytest.mark.timeout(60)
def test_engine_kwargs_pass_the_key_to_vllm(tmp_path):
    cfg = compose_job(*CHAT, "engine.block_size=64", out_dir=tmp_path)
    kw = engine_kwargs(OmegaConf.to_container(cfg.engine), OmegaConf.to_container(cfg.model))
    assert kw["block_size"] == 64
    cfg = compose_job(*CHAT, out_dir=tmp_path)
    assert "block_size" not in engine_kwargs(
        OmegaConf.to_container(cfg.engine), OmegaConf.to_container(cfg.model)
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", [0, 16, 48, 100])
def test_the_cpu_build_takes_multiples_of_32_naming_the_key(size, tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "cpu_build", lambda: True)
    with pytest.raises(ConfigError, match=r"^engine.block_size: must be a multiple of 32"):
        validate(compose_job(*CHAT, f"engine.block_size={size}", out_dir=tmp_path))
    validate(compose_job(*CHAT, "engine.block_size=64", out_dir=tmp_path))


@pytest.mark.timeout(60)
def test_elsewhere_16_and_up(tmp_path, monkeypatch):
    monkeypatch.setattr(bs, "cpu_build", lambda: False)
    validate(compose_job(*CHAT, "engine.block_size=16", out_dir=tmp_path))
    with pytest.raises(ConfigError, match=r"^engine.block_size: must be >= 16"):
        validate(compose_job(*CHAT, "engine.block_size=8", out_dir=tmp_path))


@pytest.mark.timeout(60)
def test_both_keys_set_is_refused_saying_which_to_keep(tmp_path):
    cfg = compose_job(*CHAT, "engine.block_size=32", "+engine.extra.block_size=64", out_dir=tmp_path)
    with pytest.raises(ConfigError, match="drop engine.extra.block_size"):
        validate(cfg)
    validate(compose_job(*CHAT, "+engine.extra.block_size=64", out_dir=tmp_path))  # the old way still works


@pytest.mark.timeout(60)
def test_synth_qa_sets_the_typed_key(tmp_path):
    cfg = compose_job("job=synth_qa", out_dir=tmp_path)
    validate(cfg)
    assert cfg.engine.block_size == 32 and "block_size" not in cfg.engine.extra


@pytest.mark.timeout(30)
def test_row_neutral_out_of_run_dirs_and_manifests():
    assert {"engine.block_size", "engine.extra.block_size"} <= set(ROW_NEUTRAL_KEYS)
    assert {"engine.block_size", "engine.extra.block_size"} <= set(run_dir_excluded_keys())

    def manifest(engine: dict) -> dict:
        job = {"engine": {"dtype": "float32", **engine}, "sampling": {"temperature": 0.0}}
        return build_manifest(job, model={"id": "m"}, input_fingerprint={"rows": 3}, vllm="0.32")

    before = manifest({})  # written before the key existed
    for engine in ({"block_size": None}, {"block_size": 32}, {"block_size": 128}):
        assert manifest(engine)["config_hash"] == before["config_hash"]
        assert diff(before, manifest(engine)) == []
    # synth_qa's output dirs recorded engine.extra.block_size (not yet row-neutral then): they resume.
    old = manifest({"extra": {"block_size": 32}})
    old["config"]["engine.extra.block_size"] = 32
    assert diff(old, manifest({"block_size": 32, "extra": {}})) == []
    assert diff(old, manifest({"dtype": "bfloat16"})) != []  # other keys still count


@pytest.mark.timeout(60)
def test_with_auto_block_size_sets_a_copy_only_when_shared_and_unset(tmp_path, monkeypatch):
    from sage_vllm_batch.run.model import with_auto_block_size

    monkeypatch.setattr(bs, "cpu_backend", lambda: True)
    cfg = compose_job(*CHAT, out_dir=tmp_path)
    assert with_auto_block_size(cfg, 1) is cfg
    got = with_auto_block_size(cfg, 3)
    assert got.engine.block_size == 32 and cfg.engine.block_size is None
    set64 = compose_job(*CHAT, "engine.block_size=64", out_dir=tmp_path)
    assert with_auto_block_size(set64, 3) is set64
    extra = compose_job(*CHAT, "+engine.extra.block_size=128", out_dir=tmp_path)
    assert with_auto_block_size(extra, 3) is extra
    monkeypatch.setattr(bs, "cpu_backend", lambda: False)
    assert with_auto_block_size(cfg, 3) is cfg


@pytest.mark.timeout(60)
def test_a_fused_sweep_starts_its_engine_with_the_auto_block_size(tmp_path, monkeypatch):
    import contextlib
    from types import SimpleNamespace

    from sage_vllm_batch.sweep import fused

    started = []

    class Recorder:
        load_seconds = 0.0

        def start(self, cfg, model):
            started.append(cfg.engine.block_size)

        def run_points(self, batch):
            pass

        def close(self):
            pass

    monkeypatch.setattr(bs, "cpu_backend", lambda: True)
    monkeypatch.setattr(fused, "make_executor", lambda cfg: Recorder())
    monkeypatch.setattr(fused, "hold_model", lambda cfg, purpose=None: contextlib.nullcontext(None))
    cfg = compose_job(*CHAT, out_dir=tmp_path)

    def point():
        return SimpleNamespace(cfg=cfg, metrics=SimpleNamespace(), error=None)

    fused._run_group(0, [point(), point(), point()], fuse=True)
    fused._run_group(0, [point()], fuse=True)
    assert started == [32, None]
