"""The supervisor's bookkeeping on the fake engine over a scripted vLLM core (the recovery itself
runs against the real engine in test_supervisor.py): a row that finished during a bisection probe
is not run again."""

from __future__ import annotations

from types import SimpleNamespace

from fake_engine import FakeEngine

from sage_vllm_batch.engine import IteratorFeed
from sage_vllm_batch.engine.io import EngineRequest
from sage_vllm_batch.engine.supervisor import SupervisedStream


class ScriptedVllm:
    """Each prompt is ``[steps, poison]``: a request finishes after ``steps`` steps; the engine
    dies on its third step while a poison request is inside."""

    def __init__(self) -> None:
        self.reqs: dict[str, list[int]] = {}  # rid -> [steps left, poison]
        self.steps = 0

    def add_request(self, rid, prompt, params, **extra):
        steps, poison = prompt["prompt_token_ids"]
        self.reqs[rid] = [steps, poison]

    def step(self):
        self.steps += 1
        if self.steps >= 3 and any(p for _, p in self.reqs.values()):
            raise RuntimeError("scripted crash")
        done = []
        for rid, r in list(self.reqs.items()):
            r[0] -= 1
            if r[0] <= 0 and not r[1]:
                del self.reqs[rid]
                done.append(
                    SimpleNamespace(
                        request_id=rid,
                        finished=True,
                        prompt_token_ids=[1],
                        outputs=SimpleNamespace(data=[0.0]),
                    )
                )
        return done

    def abort_request(self, rids, *a, **kw):
        for rid in rids:
            self.reqs.pop(rid, None)

    def has_unfinished_requests(self):
        return bool(self.reqs)


def scripted(max_in_flight: int) -> FakeEngine:
    """The fake engine around a scripted vLLM core (a fresh one at each restart), out of process."""
    return FakeEngine("pooling", max_in_flight=max_in_flight, vllm=ScriptedVllm, in_process=False)


def test_a_row_finished_during_a_probe_is_not_run_again():
    # x finishes first; then a joins p; the engine dies with [p, a] inside; in the probe a finishes
    # before p takes the engine down again: p alone is the poison, a is not probed again.
    rows = {"x": [1, 0], "p": [99, 1], "a": [2, 0]}
    engine = scripted(2)
    reqs = [EngineRequest(key=k, prompt_token_ids=v) for k, v in rows.items()]
    results = list(SupervisedStream(engine, IteratorFeed(reqs)).run())
    keys = [r.key for r in results]
    assert sorted(keys) == ["a", "p", "x"], keys  # every row once
    by_key = {r.key: r for r in results}
    assert by_key["p"].error.startswith("engine crash") and by_key["a"].error is None
    assert engine.restarts == 2


def test_an_engine_death_during_admission_keeps_the_rows_in_flight():
    # The engine is found dead while "d" is being added, with "a" and "b" already inside: after
    # the restart all three run again (none is dropped), and each comes back once.
    class DiesOnAdd(ScriptedVllm):
        adds = 0

        def add_request(self, rid, prompt, params, **extra):
            DiesOnAdd.adds += 1
            if DiesOnAdd.adds == 3:
                raise RuntimeError("engine core gone")
            super().add_request(rid, prompt, params, **extra)

    engine = scripted(3)
    engine.vllm_engine = DiesOnAdd()
    reqs = [
        EngineRequest(key=k, prompt_token_ids=v)
        for k, v in {"a": [3, 0], "b": [3, 0], "d": [1, 0], "e": [1, 0]}.items()
    ]
    results = list(SupervisedStream(engine, IteratorFeed(reqs)).run())
    assert sorted(r.key for r in results) == ["a", "b", "d", "e"]
    assert all(r.error is None for r in results) and engine.restarts == 1


def test_an_answered_request_comes_back_under_the_requests_own_key():
    # A repeat answered by dedup (EngineRequest.answer) and then re-keyed by a wrapper (the
    # service's EngineDriver puts its own ticket on every request) comes back under the new key.
    from dataclasses import replace

    from sage_vllm_batch.engine.io import EngineResult

    engine = scripted(2)
    answered = EngineRequest(key="orig", answer=EngineResult(key="orig", text="cached"))
    reqs = [EngineRequest(key="a", prompt_token_ids=[1, 0]), replace(answered, key=("ticket", "orig"))]
    by_key = {r.key: r for r in SupervisedStream(engine, IteratorFeed(reqs)).run()}
    assert set(by_key) == {"a", ("ticket", "orig")} and by_key[("ticket", "orig")].text == "cached"
