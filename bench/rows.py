"""How a benchmark script reports a row: a `ROW {json}` line on stdout (what a parent process or a log reader
parses) and, with --out, the row appended to a jsonl file."""
from __future__ import annotations

import json
from pathlib import Path


def emit(row: dict, out: str | Path | None) -> None:
    print("ROW " + json.dumps(row), flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
