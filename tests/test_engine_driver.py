"""One engine, many callers: concurrent requests and a batch job share one real engine."""

from __future__ import annotations

import threading

import pytest
from conftest import compose_job

from sage_vllm_batch.engine_driver import EngineDriver
from sage_vllm_batch.engine_io import EngineRequest
from sage_vllm_batch.runner import execute, prepare_point, resolve_model
from sage_vllm_batch.sink import read_output

pytestmark = pytest.mark.engine

GREEDY = {"temperature": 0.0, "max_tokens": 12}


def test_concurrent_callers_and_a_job_on_one_engine(chat_engine, registry_root, tmp_path):
    questions = [f"What is {i} plus {i}?" for i in range(12)]
    convs = [[{"role": "user", "content": q}] for q in questions]
    want = [r.text for r in chat_engine.chat(convs, GREEDY)]

    out = tmp_path / "job"
    cfg = compose_job(
        "task=chat", "model=smollm2-135m-instruct", "data.limit=6", "sampling.max_tokens=12",
        out_dir=out, registry_root=registry_root,
    )
    alone = tmp_path / "alone"
    cfg_alone = compose_job(
        "task=chat", "model=smollm2-135m-instruct", "data.limit=6", "sampling.max_tokens=12",
        out_dir=alone, registry_root=registry_root,
    )
    execute([prepare_point(cfg_alone, name="alone", model=resolve_model(cfg_alone))], chat_engine, progress="none")

    driver = EngineDriver(chat_engine)
    try:
        got: dict[int, str] = {}
        errors: list[BaseException] = []

        def caller(i):
            try:
                fut = driver.submit(EngineRequest(key=i, prompt_token_ids=driver.render_chat(convs[i]), sampling=GREEDY))
                res = fut.result(timeout=300)
                assert res.key == i
                got[i] = res.text
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(convs))]
        job = threading.Thread(
            target=lambda: execute([prepare_point(cfg, name="job", model=resolve_model(cfg))], driver, progress="none")
        )
        job.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        job.join(timeout=300)
        assert not errors, errors
        assert [got[i] for i in range(len(convs))] == want
        assert read_output(out).column("text").to_pylist() == read_output(alone).column("text").to_pylist()
        assert driver.chat(convs[:2], GREEDY)[1].text == want[1]
    finally:
        driver.close(close_engine=False)
