"""The ``metafleet`` command: dispatches to the commands each installed subpackage registers.

Commands come from the ``metafleet.commands`` entry points, so this module imports neither the client nor
the server, and a device installed without the server's extras gets a clear message for server commands.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points

from metafleet.common.errors import MetafleetError

USAGE = "usage: metafleet COMMAND [options]   (metafleet COMMAND --help for a command's options)"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {ep.name: ep for ep in entry_points(group="metafleet.commands")}
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print("commands: " + ", ".join(sorted(commands)))
        return 0 if argv else 2
    name = argv[0]
    if name not in commands:
        print(f"metafleet: unknown command '{name}' (commands: {', '.join(sorted(commands))})", file=sys.stderr)
        return 2
    try:
        command = commands[name].load()
    except ImportError as error:
        print(f"metafleet {name}: a dependency is missing ({error}); install the extra it needs, "
              "e.g. pip install 'metafleet[simulation]'", file=sys.stderr)
        return 2
    try:
        return int(command(argv[1:]) or 0)
    except MetafleetError as error:
        print(f"metafleet {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metafleet {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
