"""Write one generated section into benchmarks/RESULTS.md, replacing that section if present (other
sections, written by other scripts, are left as they are)."""
from __future__ import annotations

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
