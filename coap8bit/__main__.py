"""Command line: ``python -m coap8bit demo`` (train a small LM against bnb AdamW8bit and torch AdamW) and
``python -m coap8bit plan --model NAME`` (optimizer memory and a 24 GB fit estimate)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "coap8bit.demo", "plan": "coap8bit.planner"}
    if not argv or argv[0] not in commands:
        print("usage: python -m coap8bit {demo,plan} [options]   (each takes --help)", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(commands[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
