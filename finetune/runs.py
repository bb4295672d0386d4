"""What a run leaves for finding it again (docs/run-safety.md#finding-a-run): `status.json` in its run_dir
(`running`, then `finished`, `failed` or `interrupted`, with the error, the steps, the exports and the command
that resumes it), a `latest` link to the newest finished run, and the listing `cogft runs` prints."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
import sys
from pathlib import Path

from finetune.atomic import atomic_path
from finetune.errors import PathSettingError

STATUS_FILE = "status.json"
# Settings a resume command sets itself (the rest of the command line is repeated as the user gave it).
RESUME_SETTINGS = ("run_dir", "ckpt_path", "overwrite")


def resume_command(run_dir: Path, ckpt_path: str, overrides: list[str] | None = None,
                   program: str | None = None) -> str:
    """The command that continues this run: the command line it was started with (`overrides`, Hydra's task
    overrides; `program`, sys.argv[0]) with `run_dir` and `ckpt_path` set."""
    program = Path(program if program is not None else sys.argv[0]).name
    head = ["cogft", "train"] if program.startswith("cogft") else ["python", "train.py"]
    kept = [o for o in (overrides or []) if o.lstrip("+~").split("=", 1)[0] not in RESUME_SETTINGS]
    return shlex.join([*head, *kept, f"run_dir={Path(run_dir).resolve()}", f"ckpt_path={ckpt_path}"])


def write_status(run_dir: Path, **fields) -> dict:
    """Merge `fields` into the run's status.json (written atomically: a reader never sees half of it)."""
    path = Path(run_dir) / STATUS_FILE
    status = read_status(Path(run_dir)) or {}
    status.update(fields, updated=now())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(status, indent=2, default=str) + "\n")
    return status


def now() -> str:
    """Local time to the millisecond: runs started within one second still sort in order."""
    return datetime.datetime.now().isoformat(timespec="milliseconds")


def started(run_dir: Path, recipe: str, mode: str, max_steps: int | None, overrides: list[str] | None = None) -> dict:
    """status.json of a run that starts: `running`, with the command that would resume it if its process died
    without a word (SIGKILL, a lost node: `describe` tells those by the process being gone)."""
    return write_status(run_dir, status="running", recipe=recipe, mode=mode, max_steps=max_steps,
                        started=now(), pid=os.getpid(), host=socket.gethostname(), error=None, resume=None,
                        resume_if_killed=resume_command(run_dir, "auto", overrides))


def read_status(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def exports_of(run_dir: Path) -> list[str]:
    """The run's exported adapters: the folders under `export/` that hold a LoRA or a model."""
    root = Path(run_dir) / "export"
    if not root.is_dir():
        return []
    found = {p.parent for p in root.rglob("*") if p.suffix in (".safetensors",) or p.name == "adapter_config.json"}
    return sorted(str(p) for p in found)


def checkpoints_of(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, newest first: `checkpoints/*.ckpt` (files, or folders a sharded strategy
    writes). Checkpoints are written under a temporary name and renamed (finetune/checkpointing.py), so each is
    whole."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.suffix == ".ckpt" and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def link_latest(link: Path, run_dir: Path) -> None:
    """Point `link` at `run_dir` (relative when they share a folder), replacing an older link atomically. A file or
    folder already at `link` that is not a link is left alone."""
    link, run_dir = Path(link), Path(run_dir)
    if link.exists() and not link.is_symlink():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        target = os.path.relpath(run_dir.resolve(), link.parent.resolve())
    except ValueError:  # another drive (Windows)
        target = str(run_dir.resolve())
    partial = link.with_name(f".{link.name}.{os.getpid()}")
    if partial.is_symlink():
        partial.unlink()
    try:
        os.symlink(target, partial, target_is_directory=True)
        os.replace(partial, link)
    except OSError:  # a filesystem without links: the status files still say which run finished
        if partial.is_symlink():
            partial.unlink()


def check_adapter_path(path: str | os.PathLike) -> None:
    """`adapter_path` names something to load: refused before any model loads when it does not exist or is (in) the
    folder of a run that did not finish, with that run's status and where finished runs are."""
    path = Path(path)
    run_dir = next((p for p in (path, path.parent) if (p / STATUS_FILE).is_file()), None)
    status = read_status(run_dir) if run_dir is not None else None
    if status and status.get("status") != "finished":
        error = f" ({str(status['error']).splitlines()[0]})" if status.get("error") else ""
        raise PathSettingError(
            f"adapter_path={str(path)!r}: the run {run_dir} did not finish: {status.get('status')}{error}, so it has "
            f"no final export. Pick a finished run's export (`cogft runs` lists them; the newest is "
            f"{run_dir.parent / 'latest' / 'export'}), or resume this one first: {status.get('resume') or '-'}")
    if not path.exists():
        raise PathSettingError(f"adapter_path={str(path)!r} does not exist. Pass an export folder (a run's export/; "
                               f"`cogft runs` lists them) or a LoRA file.")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def find_runs(root: Path) -> list[Path]:
    """Run directories under `root` (default layout `outputs/<recipe>/<time>`, or any folder holding a run's
    config.yaml or status.json, two levels deep at most), oldest first. Links (`latest`) are skipped."""
    root = Path(root)
    runs = set()
    for pattern in ("*", "*/*"):
        for marker in ("config.yaml", STATUS_FILE):
            for path in root.glob(f"{pattern}/{marker}"):
                if not any(part.is_symlink() for part in _ancestors(path.parent, root)):
                    runs.add(path.parent)
    return sorted(runs, key=lambda p: (read_status(p) or {}).get("started") or _mtime(p))


def _ancestors(path: Path, root: Path):
    while path != root and root in path.parents:
        yield path
        path = path.parent


def _mtime(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="milliseconds")


def describe(run_dir: Path) -> dict:
    """A run's status for listing: its status.json, or what the folder shows for a run without one (an earlier kit
    version's, or a process killed with no chance to write it: SIGKILL, a lost node)."""
    status = dict(read_status(run_dir) or {})
    if not status:
        status = {"status": "unknown (no status.json)", "started": _mtime(run_dir)}
    elif status.get("status") == "running" and status.get("host") == socket.gethostname() \
            and not pid_alive(status.get("pid", -1)):
        status["status"] = "killed"  # the process is gone without writing how it ended
        if checkpoints_of(run_dir):
            status["resume"] = status.get("resume_if_killed")
    status.setdefault("exports", exports_of(run_dir))
    return status


def runs_table(root: Path) -> str:
    """`cogft runs`: one line per run (when it started, status, steps, where) and its exports or resume command."""
    rows = []
    for run_dir in find_runs(root):
        status = describe(run_dir)
        steps = status.get("step")
        steps = f"{steps}/{status.get('max_steps')}" if steps is not None and status.get("max_steps") else (
            str(steps) if steps is not None else "-")
        rows.append((str(status.get("started", "-")), str(status.get("status")), steps, str(run_dir), status))
    if not rows:
        return f"no runs under {root} (a run's folder holds config.yaml and status.json)"
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for started_at, state, steps, where, status in rows:
        lines.append(f"{started_at:<{widths[0]}}  {state:<{widths[1]}}  {steps:>{widths[2]}}  {where}")
        for export in status.get("exports") or []:
            lines.append(f"    export: {export}")
        if status.get("status") != "finished" and status.get("error"):
            lines.append(f"    error: {str(status['error']).splitlines()[0]}")
        if status.get("status") != "finished" and status.get("resume"):
            lines.append(f"    resume: {status['resume']}")
    return "\n".join(lines)
