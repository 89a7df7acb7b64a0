"""Run argilla_server's own CLI with our SQL-backed search engine registered.

Usage (with the server venv's python): ``python launcher.py database migrate|users create ...|start ...|worker ...``.
Several commands can run in one process (saves the ~4 s import each): separate them with ``++``.
The engine module sits next to this file; importing it registers the engine under the name "rlhf-sql",
which ARGILLA_SEARCH_ENGINE selects.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import engine  # noqa: E402,F401  (registers the engine)
from argilla_server.cli.__main__ import app  # noqa: E402


def main(argv: list[str]) -> int:
    commands, current = [], []
    for arg in argv:
        if arg == "++":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for args in commands:
        try:
            app(args=args, prog_name="argilla_server", standalone_mode=False)
        except SystemExit as e:
            if e.code not in (0, None):
                return e.code if isinstance(e.code, int) else 1
        except Exception as e:  # click usage errors, failures inside a command
            print(f"error in {' '.join(args[:3])}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
