"""Running services: each server writes a small record (pid, address, models, start time) that
``sage-vllm-services status`` lists and ``sage-vllm-services stop`` uses to stop it cleanly
(SIGTERM, then wait for the process to exit)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer

STATE_ENV = "SAGE_VLLM_SERVICES_DIR"


def state_dir() -> Path:
    d = os.environ.get(STATE_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "sage-vllm-batch", "services"
    )
    return Path(d)


def register(*, url: str, host: str, port: int, models: dict[str, str]) -> Path:
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{os.getpid()}.json"
    rec = {
        "pid": os.getpid(),
        "url": url,
        "host": host,
        "port": port,
        "models": models,
        "started_at": time.time(),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    tmp.replace(path)
    return path


def unregister(path: Path) -> None:
    path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running() -> list[dict[str, Any]]:
    """Records of live services (records of dead processes are removed)."""
    out = []
    d = state_dir()
    if not d.is_dir():
        return out
    for p in sorted(d.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if not _alive(int(rec.get("pid", -1))):
            p.unlink(missing_ok=True)
            continue
        rec["uptime_s"] = round(time.time() - float(rec["started_at"]), 1)
        out.append(rec)
    return out


def find(target: str) -> dict[str, Any]:
    """A running service by pid, port or URL."""
    for rec in running():
        if target in (str(rec["pid"]), str(rec["port"]), rec["url"], rec["url"].rstrip("/")):
            return rec
    raise LookupError(f"no running service matches {target!r}; see `sage-vllm-services status`")


def stop(target: str, timeout: float = 30.0) -> dict[str, Any]:
    """SIGTERM the service and wait for it to exit (it finishes or aborts what is in flight)."""
    rec = find(target)
    pid = int(rec["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid) or _zombie(pid):
            return rec
        time.sleep(0.2)
    raise TimeoutError(f"service {pid} did not exit within {timeout:.0f}s; `kill -9 {pid}` stops it hard")


def _zombie(pid: int) -> bool:
    try:
        import psutil

        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except Exception:
        return False


app = typer.Typer(
    name="sage-vllm-services",
    help="See running sage-vllm-batch services (mode=serve) and stop them.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("status")
def status_cmd(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """List running services: pid, address, models, uptime."""
    recs = running()
    if as_json:
        typer.echo(json.dumps(recs, indent=2))
        return
    if not recs:
        typer.echo("no running services")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("pid", "address", "models", "uptime")
    for r in recs:
        models = ", ".join(f"{k}: {v}" for k, v in r["models"].items())
        t.add_row(str(r["pid"]), r["url"], models, f"{r['uptime_s'] / 60:.1f} min")
    Console().print(t)


@app.command("stop")
def stop_cmd(
    target: Annotated[str, typer.Argument(help="pid, port or URL of the service")],
    timeout: Annotated[float, typer.Option(help="seconds to wait for it to exit")] = 30.0,
) -> None:
    """Stop a running service cleanly (SIGTERM, wait for exit)."""
    try:
        rec = stop(target, timeout)
    except (LookupError, TimeoutError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"stopped {rec['pid']} ({rec['url']})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
