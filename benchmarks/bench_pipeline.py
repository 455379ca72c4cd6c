"""A pipeline against its stages as separate jobs: ``job=synth_qa`` as one ``task=pipeline`` run,
and the same four stages as four CLI runs glued together by a script, wall time of each.

    python benchmarks/bench_pipeline.py [--rows 64] [--repeats 1]

The same first ``--rows`` KJV verses (``data.limit``), the same rendered prompts, system prompt
and greedy sampling (``max_tokens`` per stage as in ``jobs/synth_qa.yaml``), two variants, each
timed from the parent, from the first process start to the last exit, alternating (a, b, a, b):

  (a) pipeline  python -m sage_vllm_batch job=synth_qa data.limit=N output.dir=...
                (one process; SmolLM2 loaded once for question, answer and judge, MiniLM once
                for pair; chunks of 16 rows stream from stage to stage)
  (b) separate  four CLI runs, each reading the Parquet the one before wrote, the way a user
                chains jobs without ``task=pipeline``:
                  question  task=chat over the verses (data=example_embed), the verse passed
                            through (``output.passthrough_columns=[citation,text]``; the runner
                            writes it as ``input_text``, since ``text`` is chat's answer column)
                  answer    task=chat over question's output dir, the template naming
                            ``{input_text}`` (the verse) and ``{text}`` (the question)
                  (glue)    pyarrow: question's and answer's outputs joined on ``citation`` into
                            one table of verse, question, answer (answer's job cannot pass both
                            through: the verse and the question would both be ``input_text``)
                  judge     task=classify task.labels=[yes,no] over that table
                  (glue)    pyarrow: the rows with score(judge_scores, 'yes') >= 0.25, as
                            ``when:`` keeps them in the pipeline
                  pair      task=embed model=minilm-l6-v2 over the kept rows
                (four engine loads, four process start-ups; the glue is timed as part of (b))

Prints the wall seconds of every run (and of (b)'s steps), the ratio (b)/(a) (best and median;
target >= 1.3: printed, not asserted), and how well the outputs agree, per stage: the fraction
of rows whose question / answer / judge label are equal between (a) and (b), and for pair the
fraction whose keep-or-skip decision matches with vectors of cosine >= 0.999. Before anything is
timed it checks that (b)'s jobs render the same prompts as the pipeline's stages. Writes
``benchmarks/results/pipeline.json``. The judge itself (classify against
``structured_outputs.choice``) is compared by ``benchmarks/bench_classify.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_args,
    compose,
    machine_info,
    median,
    now_utc,
    registry_root,
    run_cli,
    write_results,
)

TARGET = 1.3
JOB = "synth_qa"
CHAT_MODEL = "smollm2-135m-instruct"
EMBED_MODEL = "minilm-l6-v2"
# Mirrors jobs/synth_qa.yaml (checked against it by check_prompts before anything is timed).
SYSTEM = "You write and check quiz questions about Bible verses. Be brief."
T_QUESTION = "Verse: {text}\n\nWrite one short question that this verse answers."
T_ANSWER = "Verse: {input_text}\n\nAnswer this question in one sentence: {text}"
T_JUDGE = (
    "Verse: {text}\n\nQuestion: {question}\nAnswer: {answer}\n\n"
    "Does the verse support the answer? Answer yes or no."
)
T_PAIR = "{question} {answer}"
KEEP_YES = 0.25  # the pair stage's when: score(judge_scores, 'yes') >= 0.25
MAX_TOKENS = {"question": 32, "answer": 48}
ENGINE = ["+engine.extra.block_size=32"]  # the preset's KV block size (its stages share prefixes)
STEPS = ("question", "answer", "glue_judge", "judge", "glue_pair", "pair")


def quoted(key: str, value: str) -> str:
    """A Hydra override of a string holding spaces, braces, newlines or ``?`` (quoted)."""
    if "'" in value:
        raise ValueError(f"{key}: a value with a single quote needs escaping: {value!r}")
    return f"{key}='{value}'"


def separate_jobs(rows: int, work: Path) -> dict[str, list[str]]:
    """The overrides of (b)'s four jobs (output.dir and the common ones added by the caller)."""
    chat = ["model=" + CHAT_MODEL, quoted("data.system_prompt", SYSTEM), "sampling.temperature=0", *ENGINE]
    parquet = ["data=parquet", "data.id_column=citation"]
    return {
        "question": [
            "task=chat",
            *chat,
            "data=example_embed",
            f"data.limit={rows}",
            quoted("data.prompt_template", T_QUESTION),
            f"sampling.max_tokens={MAX_TOKENS['question']}",
            "output.passthrough_columns=[citation,text]",
        ],
        "answer": [
            "task=chat",
            *chat,
            *parquet,
            f"data.path={work / 'question'}",
            quoted("data.prompt_template", T_ANSWER),
            f"sampling.max_tokens={MAX_TOKENS['answer']}",
            "output.passthrough_columns=[citation]",
        ],
        "judge": [
            "task=classify",
            "task.labels=[yes,no]",
            *chat,
            *parquet,
            f"data.path={work / 'judge_in.parquet'}",
            quoted("data.prompt_template", T_JUDGE),
            "output.passthrough_columns=[citation,question,answer]",
        ],
        "pair": [
            "task=embed",
            "model=" + EMBED_MODEL,
            *ENGINE,
            *parquet,
            f"data.path={work / 'pair_in.parquet'}",
            quoted("data.prompt_template", T_PAIR),
            "output.passthrough_columns=[citation]",
        ],
    }


def check_prompts(rows: int, root: Path, extra: list[str], work: Path) -> list[str]:
    """Differences between (b)'s jobs and the pipeline's stages, as composed (empty: none).

    Compares each stage's system prompt, sampling and task keys, and its template rendered on a
    sample row (the separate answer job names the verse ``input_text`` and the question ``text``).
    """
    from omegaconf import OmegaConf

    from sage_vllm_batch.run.stage import stage_job

    probe = work / "probe"
    pipe = compose(f"job={JOB}", f"data.limit={rows}", *extra, out_dir=probe, registry_root=root)
    row = {"text": "VERSE", "question": "QUESTION", "answer": "ANSWER"}
    # The names each separate job's template reads the same values under.
    as_named = {"answer": {"input_text": "VERSE", "text": "QUESTION"}}
    jobs = separate_jobs(rows, work)
    problems = []
    for name, stage in pipe.stages.items():
        a = stage_job(pipe, str(name), stage, probe)
        b = compose(*jobs[str(name)], *extra, out_dir=probe, registry_root=root)
        want = a.data.prompt_template.format(**row)
        got = b.data.prompt_template.format(**as_named.get(str(name), row))
        if want != got:
            problems.append(f"{name}: prompt {got!r} != pipeline's {want!r}")
        if a.task.type != "embed" and a.data.system_prompt != b.data.system_prompt:
            problems.append(f"{name}: system_prompt {b.data.system_prompt!r} != {a.data.system_prompt!r}")
        if a.model.id != b.model.id:
            problems.append(f"{name}: model {b.model.id} != {a.model.id}")
        if a.task.type in ("chat", "generate"):
            sa, sb = OmegaConf.to_container(a.sampling), OmegaConf.to_container(b.sampling)
            if sa != sb:
                diff = {k: (sb.get(k), v) for k, v in sa.items() if sb.get(k) != v}
                problems.append(f"{name}: sampling differs (separate, pipeline): {diff}")
        if a.task.type == "classify" and list(a.task.labels) != list(b.task.labels):
            problems.append(f"{name}: labels {list(b.task.labels)} != {list(a.task.labels)}")
        if OmegaConf.to_container(a.engine) != OmegaConf.to_container(b.engine):
            problems.append(f"{name}: engine config differs")
    return problems


def read_dir(path: Path):
    import pyarrow.parquet as pq

    return pq.read_table(sorted(path.glob("part-*.parquet")))


def yes_score(scores: Any) -> float | None:
    """A ``label_scores`` map value (a dict, or the (key, value) pairs Arrow gives) at ``yes``."""
    if scores is None:
        return None
    items = scores.items() if isinstance(scores, dict) else scores
    return dict(items).get("yes")


def glue_judge(work: Path) -> int:
    """question's and answer's outputs into one table of citation, text (verse), question, answer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    q = read_dir(work / "question").to_pylist()
    a = {r["citation"]: r for r in read_dir(work / "answer").to_pylist()}
    rows = [
        {
            "citation": r["citation"],
            "text": r["input_text"],
            "question": r["text"],
            "answer": a[r["citation"]]["text"],
        }
        for r in q
        if r["error"] is None and r["citation"] in a and a[r["citation"]]["error"] is None
    ]
    schema = pa.schema([(k, pa.string()) for k in ("citation", "text", "question", "answer")])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), work / "judge_in.parquet")
    return len(rows)


def glue_pair(work: Path) -> int:
    """The judged rows the pipeline's ``when`` keeps: score(judge_scores, 'yes') >= KEEP_YES."""
    import pyarrow.parquet as pq

    t = read_dir(work / "judge")
    scores = [yes_score(s) for s in t.column("label_scores").to_pylist()]
    errors = t.column("error").to_pylist()
    keep = [e is None and s is not None and s >= KEEP_YES for s, e in zip(scores, errors, strict=True)]
    import pyarrow as pa

    kept = t.filter(pa.array(keep)).select(["citation", "question", "answer"])
    pq.write_table(kept, work / "pair_in.parquet")
    return kept.num_rows


def common_args(root: Path, extra: list[str]) -> list[str]:
    return ["progress=none", f"registry.root={root}", *extra]


def run_a(rows: int, root: Path, extra: list[str], work: Path, round_no: int) -> dict[str, Any]:
    cwd = work / f"a{round_no}"
    cwd.mkdir(parents=True)
    out = cwd / "out"
    r = run_cli(
        [f"job={JOB}", f"data.limit={rows}", f"output.dir={out}", *common_args(root, extra)],
        cwd=cwd,
        log_path=cwd / "run.log",
        done=lambda: (out / "_SUCCESS").exists(),
    )
    m = json.loads((out / "metrics.json").read_text())
    res = {
        "wall_seconds": round(r.wall_seconds, 2),
        "rows": m["rows_total"],
        "kept_rows": m["kept_rows"],
        "error_rows": m["error_rows"],
        "load_seconds": m["load_seconds"],
        # For the record only, not comparable between (a) and (b): a pipeline's own clock starts
        # before vLLM is imported, a plain job's after (so are its load_seconds).
        "process_seconds": round(r.wall_seconds - float(m["wall_seconds"]), 2),
        "processes": 1,
        "engine_loads": len(m["models"]),
        "exit_code": r.returncode,
        "out": str(out),
    }
    print(
        f"   round {round_no} (a) pipeline {r.wall_seconds:7.1f}s  ({res['rows']} rows, {res['kept_rows']} "
        f"kept, engine loads {res['load_seconds']:.1f}s)",
        flush=True,
    )
    return res


def run_b(rows: int, root: Path, extra: list[str], work: Path, round_no: int) -> dict[str, Any]:
    cwd = work / f"b{round_no}"
    cwd.mkdir(parents=True)
    jobs = separate_jobs(rows, cwd)
    steps: dict[str, float] = {}
    loads = process = 0.0
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    for step in STEPS:
        s0 = time.perf_counter()
        if step == "glue_judge":
            counts[step] = glue_judge(cwd)
        elif step == "glue_pair":
            counts[step] = glue_pair(cwd)
        else:
            out = cwd / step
            r = run_cli(
                [*jobs[step], f"job_name=bench_{step}", f"output.dir={out}", *common_args(root, extra)],
                cwd=cwd,
                log_path=cwd / f"{step}.log",
                done=lambda out=out: (out / "_SUCCESS").exists(),
            )
            m = json.loads((out / "metrics.json").read_text())
            loads += float(m.get("load_seconds") or 0.0)
            process += r.wall_seconds - float(m["wall_seconds"])
            counts[step] = int(m["rows_out"])
        steps[step] = round(time.perf_counter() - s0, 2)
    wall = time.perf_counter() - t0
    res = {
        "wall_seconds": round(wall, 2),
        "rows": counts["question"],
        "kept_rows": counts["pair"],
        "load_seconds": round(loads, 2),
        "process_seconds": round(process, 2),
        "processes": 4,
        "engine_loads": 4,
        "step_seconds": steps,
        "rows_per_step": counts,
        "out": str(cwd),
    }
    shown = ", ".join(f"{k} {v:.1f}s" for k, v in steps.items())
    print(f"   round {round_no} (b) separate {wall:7.1f}s  ({shown})", flush=True)
    return res


def cosine(u: list[float], v: list[float]) -> float:
    dot = sum(x * y for x, y in zip(u, v, strict=True))
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(y * y for y in v))
    return dot / (nu * nv) if nu and nv else 0.0


def agreement(a_out: Path, b_dir: Path) -> dict[str, Any]:
    """Per stage, the fraction of rows whose output is the same in (a) and (b)."""
    a = {r["citation"]: r for r in read_dir(a_out).to_pylist()}
    b = {
        step: {r["citation"]: r for r in read_dir(b_dir / step).to_pylist()}
        for step in ("question", "answer", "judge", "pair")
    }
    n = len(a)
    col_b = {"question": "text", "answer": "text", "judge": "label"}
    res: dict[str, Any] = {"rows": n}
    for stage, col in col_b.items():
        same = sum(
            1 for c, r in a.items() if r[stage] is not None and r[stage] == b[stage].get(c, {}).get(col)
        )
        res[stage] = round(same / max(n, 1), 4)
    cosines, same = [], 0
    for c, r in a.items():
        va, rb = r["pair"], b["pair"].get(c)
        vb = rb["embedding"] if rb is not None and rb["error"] is None else None
        if va is None and vb is None:
            same += 1
        elif va is not None and vb is not None:
            cos = cosine(va, vb)
            cosines.append(cos)
            same += cos >= 0.999
    res["pair"] = round(same / max(n, 1), 4)
    res["pair_min_cosine"] = round(min(cosines), 6) if cosines else None
    res["kept"] = {"a": sum(1 for r in a.values() if r["pair"] is not None), "b": len(b["pair"])}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64, help="KJV verses, data.limit (default 64)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of (a) then (b) (default 1)")
    add_common_args(ap)
    ap.add_argument("--keep", action="store_true", help="keep the temporary work dir (outputs, logs)")
    args = ap.parse_args(argv)
    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="sage-bench-pipeline-"))
    runs: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    try:
        with registry_root(args.registry_root, ["chat", "embed"]) as root:
            problems = check_prompts(args.rows, root, args.override, work)
            if problems:
                print("== (b) would not do the pipeline's work:\n   " + "\n   ".join(problems), flush=True)
                return 1
            print("== (b)'s jobs render the pipeline's prompts (templates, system prompt, sampling)")
            print(f"== {args.rows} verses, {args.repeats} round(s) of (a) pipeline, (b) separate", flush=True)
            for r in range(args.repeats):
                runs["a"].append(run_a(args.rows, root, args.override, work, r + 1))
                runs["b"].append(run_b(args.rows, root, args.override, work, r + 1))
            agree = agreement(Path(runs["a"][-1]["out"]), Path(runs["b"][-1]["out"]))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    wa = [x["wall_seconds"] for x in runs["a"]]
    wb = [x["wall_seconds"] for x in runs["b"]]
    ratios = [b / a for a, b in zip(wa, wb, strict=True)]
    best_ratio = min(wb) / min(wa)
    med_ratio = median(ratios)
    print("\n" + "=" * 80)
    print(
        f"{'variant':14} {'best wall s':>12} {'median s':>9} {'rows':>5} {'kept':>5} {'processes':>10} "
        f"{'engine loads':>13}"
    )
    for key, name in (("a", "(a) pipeline"), ("b", "(b) separate")):
        r0 = min(runs[key], key=lambda x: x["wall_seconds"])
        med = statistics.median([x["wall_seconds"] for x in runs[key]])
        print(
            f"{name:14} {r0['wall_seconds']:>12.1f} {med:>9.1f} {r0['rows']:>5} {r0['kept_rows']:>5} "
            f"{r0['processes']:>10} {r0['engine_loads']:>13}"
        )
    rb = min(runs["b"], key=lambda x: x["wall_seconds"])
    print("(b)'s steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in rb["step_seconds"].items()))
    met = "met" if best_ratio >= TARGET else "NOT met"
    print(
        f"separate / pipeline wall ratio: best {best_ratio:.3f}, median {med_ratio:.3f} "
        f"(target >= {TARGET}: {met} on the best)"
    )
    print(
        f"outputs equal in (a) and (b), fraction of {agree['rows']} rows: question {agree['question']:.1%}, "
        f"answer {agree['answer']:.1%}, judge {agree['judge']:.1%}, pair {agree['pair']:.1%} "
        f"(kept a {agree['kept']['a']}, b {agree['kept']['b']}; min cosine {agree['pair_min_cosine']})"
    )
    print("the judge alone, classify against structured_outputs.choice: benchmarks/bench_classify.py")
    print("=" * 80)
    for rs in runs.values():
        for x in rs:
            x.pop("out", None)
    path = write_results(
        "pipeline.json",
        {
            "benchmark": "pipeline",
            "finished_at": now_utc(),
            "machine": info,
            "rows": args.rows,
            "repeats": args.repeats,
            "overrides": args.override,
            "a_pipeline": runs["a"],
            "b_separate": runs["b"],
            "ratio_separate_over_pipeline_best": round(best_ratio, 3),
            "ratio_separate_over_pipeline_median": round(med_ratio, 3),
            "target": TARGET,
            "target_met": best_ratio >= TARGET,
            "agreement": agree,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
