"""The `speedx` console script: `speedx <command> [args]` runs `python -m speedx.<command>`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"generate": "speedx.generate", "demo": "speedx.demo", "mine": "speedx.embed.mine", "train": "speedx.train",
            "eval": "speedx.eval", "align": "speedx.align.cli", "serve": "speedx.serve"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: speedx <command> [args]\n\ncommands:\n" + "\n".join(f"  {name}" for name in COMMANDS))
        sys.exit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    sys.exit(importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]))


if __name__ == "__main__":
    main()
