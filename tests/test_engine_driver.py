"""One engine, many callers: concurrent requests and a batch job share one real engine."""

from __future__ import annotations

import threading

import pytest
from helpers import compose_job

from sage_vllm_batch.engine.driver import EngineDriver
from sage_vllm_batch.engine.io import EngineRequest
from sage_vllm_batch.outputs.shards import read_output
from sage_vllm_batch.run.drive import run_on_engine
from sage_vllm_batch.run.model import resolve_model
from sage_vllm_batch.run.point import prepare_point

pytestmark = pytest.mark.engine

GREEDY = {"temperature": 0.0, "max_tokens": 12}


def test_concurrent_callers_and_a_job_on_one_engine(chat_engine, registry_root, tmp_path):
    questions = [f"What is {i} plus {i}?" for i in range(12)]
    convs = [[{"role": "user", "content": q}] for q in questions]
    want = [r.text for r in chat_engine.chat(convs, GREEDY)]

    out = tmp_path / "job"
    cfg = compose_job(
        "task=chat",
        "model=smollm2-135m-instruct",
        "data.limit=6",
        "sampling.max_tokens=12",
        out_dir=out,
        registry_root=registry_root,
    )
    alone = tmp_path / "alone"
    cfg_alone = compose_job(
        "task=chat",
        "model=smollm2-135m-instruct",
        "data.limit=6",
        "sampling.max_tokens=12",
        out_dir=alone,
        registry_root=registry_root,
    )
    run_on_engine(
        [prepare_point(cfg_alone, name="alone", model=resolve_model(cfg_alone))], chat_engine, progress="none"
    )

    driver = EngineDriver(chat_engine)
    try:
        got: dict[int, str] = {}
        errors: list[BaseException] = []

        def caller(i):
            try:
                fut = driver.submit(
                    EngineRequest(key=i, prompt_token_ids=driver.render_chat(convs[i]), sampling=GREEDY)
                )
                res = fut.result(timeout=300)
                assert res.key == i
                got[i] = res.text
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(convs))]
        job = threading.Thread(
            target=lambda: run_on_engine(
                [prepare_point(cfg, name="job", model=resolve_model(cfg))], driver, progress="none"
            )
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


LONG = {"temperature": 0.0, "max_tokens": 1500, "ignore_eos": True}


def test_a_cancelled_request_is_aborted_in_the_engine(chat_engine):
    driver = EngineDriver(chat_engine)
    try:
        prompt = driver.render_chat([{"role": "user", "content": "Tell me a very long story."}])
        cancel = threading.Event()
        seen = []

        def on_output(out):  # engine thread: give up after the first tokens
            seen.append(len(out.outputs[0].token_ids))
            cancel.set()

        fut = driver.submit(
            EngineRequest(
                key="long", prompt_token_ids=prompt, sampling=LONG, on_output=on_output, cancel=cancel
            )
        )
        res = fut.result(timeout=300)
        assert res.error is not None and res.error.startswith("cancelled")
        assert max(seen) < 100  # stopped within a few steps, not after 1,500 tokens
        assert not chat_engine.vllm_engine.has_unfinished_requests()
        # A request cancelled before it reached the engine never runs; the engine keeps serving.
        gone = threading.Event()
        gone.set()
        res = driver.submit(
            EngineRequest(key="x", prompt_token_ids=prompt, sampling=LONG, cancel=gone)
        ).result(timeout=60)
        assert res.error.startswith("cancelled")
        (ok,) = driver.chat([[{"role": "user", "content": "Say hi."}]], GREEDY)
        assert ok.error is None and ok.text
    finally:
        driver.close(close_engine=False)


def test_a_server_request_left_early_is_cancelled(chat_engine):
    import asyncio

    from vllm import SamplingParams

    from sage_vllm_batch.service.engine_client import DriverEngineClient

    driver = EngineDriver(chat_engine)
    futures = []
    submit = driver.submit
    driver.submit = lambda req: futures.append(submit(req)) or futures[-1]
    try:
        client = DriverEngineClient(lambda: driver)
        prompt = {
            "prompt_token_ids": driver.render_chat([{"role": "user", "content": "Tell me a long story."}])
        }

        async def leave_after_first_output():
            gen = client.generate(prompt, SamplingParams(**LONG), "req-1")
            first = await gen.__anext__()
            await gen.aclose()  # what vLLM's handler does when the HTTP client disconnects
            return first

        first = asyncio.run(leave_after_first_output())
        assert not first.finished
        (fut,) = futures
        res = fut.result(timeout=300)
        assert res.error is not None and res.error.startswith("cancelled")
        assert not chat_engine.vllm_engine.has_unfinished_requests()
    finally:
        driver.close(close_engine=False)


def test_job_requests_are_held_back_while_interactive_requests_are_about(monkeypatch):
    """The feed's admission logic alone (no engine): jobs fill up to the idle cap, drop to the
    busy cap while interactive requests are inside or recent, and get the idle cap back later."""
    import sage_vllm_batch.engine.driver as drv

    clock = [100.0]
    monkeypatch.setattr(drv.time, "monotonic", lambda: clock[0])
    feed = drv._SharedFeed(True, idle_cap=4, busy_cap=1)
    job = drv._Job()
    feed.add_job(job)
    for i in range(10):
        feed.offer(job, EngineRequest(key=("job", i), prompt_token_ids=[1]))
    got = [feed.poll(block=False) for _ in range(6)]
    assert [r.key for r in got[:4]] == [("job", i) for i in range(4)] and got[4:] == [None, None]
    feed.put(EngineRequest(key="chat", prompt_token_ids=[1]))
    assert feed.poll(block=False).key == "chat"  # interactive first, whatever the jobs hold
    feed.job_inside = 1  # three job results came back
    assert feed.poll(block=False) is None  # busy: the job stays at one request inside
    feed.interactive_inside = 0  # the chat answered; still recent
    clock[0] += drv.BUSY_HOLD_S / 2
    assert feed.poll(block=False) is None
    clock[0] += drv.BUSY_HOLD_S
    assert [feed.poll(block=False).key for _ in range(3)] == [("job", 4), ("job", 5), ("job", 6)]
    assert feed.poll(block=False) is None and feed.job_inside == 4
