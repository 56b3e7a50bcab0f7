"""Write one generated section into benchmarks/RESULTS.md, replacing that section if present (other
sections, written by other scripts, are left as they are)."""
from __future__ import annotations

import json
import os
import re

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(heading: str, body: str, path: str = RESULTS) -> None:
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    section = f"## {heading}\n\n{body.rstrip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def publish(heading: str, body: str, *, json_path: str | None = None, payload=None, write: bool = False) -> None:
    """What a benchmark does with its result: print ``body``, save ``payload`` as JSON at ``json_path`` (when
    given) and, with ``write``, replace its section ``heading`` of RESULTS.md with ``body``."""
    print(body)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)
    if write:
        write_section(heading, body)
