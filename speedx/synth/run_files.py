"""The run directory: append-only JSONL files that survive a kill, and atomic JSON writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


def atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


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
    for number, line in enumerate(text.splitlines(), start=1):
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
