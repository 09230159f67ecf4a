"""``xai-ray``: the installed entry point (``pip install .`` puts it on PATH).

    xai-ray run --config quick [--set KEY=VALUE ...] [--until STAGE ...]   # = python -m pipelines.full
    xai-ray keep save|restore --config paper                              # = python -m pipelines.keep
    xai-ray configs                                                       # the shipped configs

Built-in configs resolve by name (``quick``, ``paper``, ``cub``, ...), paths still work; outputs
(``runs/``, ``mlflow.db``, ``artifacts/``) go to the current directory.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd == "run":
        from pipelines import full

        return full.main(rest)
    if cmd == "keep":
        from pipelines import keep

        return keep.main(rest)
    if cmd == "configs":
        from pipelines.config import CONFIGS

        for p in sorted(CONFIGS.glob("*.yaml")):
            print(f"{p.stem:12s} {p}")
        return 0
    print(f"xai-ray: unknown command {cmd!r}; expected run, keep or configs (xai-ray --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
