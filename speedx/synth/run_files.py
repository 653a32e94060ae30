"""The run directory: append-only JSONL files that survive a kill, atomic writes, and a lock."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


LOCK_FILE = ".lock"


def atomic_write_text(path: Path, text: str) -> None:
    """The whole file or none of it: a killed write leaves only the temp file (same folder, so the
    rename is atomic)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_manifest(path: Path) -> dict:
    """A run's manifest.json, {} when there is none; a damaged one stops with its name."""
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        problem = "not a manifest object"
    except UnicodeDecodeError:
        manifest, problem = None, "not UTF-8 text"
    except json.JSONDecodeError as exc:
        manifest, problem = None, f"not valid JSON: {exc.msg} at line {exc.lineno}"
    if isinstance(manifest, dict) and isinstance(manifest.get("config", {}), dict):
        return manifest
    raise ValueError(f"{path} is damaged ({problem}): delete it and re-run the command that made the run "
                     "(it resumes from its .jsonl files)")


def lock_run_dir(out: Path):
    """Hold an exclusive lock on `out` while the returned file is open: two processes appending to
    one run would do every attempt twice. The kernel drops the lock when the process dies."""
    import fcntl

    file = open(out / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        if isinstance(exc, BlockingIOError):
            raise ValueError(f"another speedx.generate is writing to {out} (pid {holder}): wait for it to end, "
                             "or use another --out") from None
        raise ValueError(f"cannot lock {out / LOCK_FILE}: {exc.strerror}") from None
    file.truncate(0)  # in append mode the pid then lands at offset 0
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file


class JsonlAppender:
    """Appends one record per line; each record is one write + flush + fsync, so a kill leaves at
    most a partial last line, which `read_jsonl(..., repair=True)` cuts off on resume."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def read_jsonl(path: Path, repair: bool = False) -> Iterator[dict]:
    """Records of a JSONL file; with repair=True a torn last line (a killed write) is truncated away."""
    if not path.exists():
        return
    data = path.read_bytes()
    if repair and data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    for _, record in numbered_json_lines(path, data.decode("utf-8")):
        yield record


def numbered_json_lines(path: Path, text: str | None = None, error: type[ValueError] = ValueError) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a JSONL file (or of `text`, read from
    it); a line that is not JSON raises `error` naming path:line."""
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise error(f"{path} is not UTF-8 text (JSON lines)") from None
    # Only "\n" ends a record: str.splitlines() would also split at U+2028, \x1c, \f ... that
    # json.dumps(ensure_ascii=False) leaves raw inside strings. A "\r" before it is JSON whitespace.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{number}: not valid JSON ({exc.msg})") from None


def ensure_writable_dir(out: Path, flag: str = "--out") -> None:
    """Create `out` and prove a file can be written there, before any work starts. The probe file
    has a unique name: processes of one run (torchrun ranks) check the same folder at once."""
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write to {flag} {out}: {exc.strerror}") from None
