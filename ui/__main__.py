"""`python -m ui`: serve the app (on 127.0.0.1:7860 unless told otherwise)."""

from __future__ import annotations

import argparse
import sys

from sdlora.compat import StackError, check_stack
from ui.app import DEFAULT_HOST, DEFAULT_PORT, launch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ui", description="The sdlora web app.")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"Address to serve on (default {DEFAULT_HOST}).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port (default {DEFAULT_PORT}).")
    parser.add_argument(
        "--listen", action="store_true", help="Serve on all interfaces (0.0.0.0), e.g. on a LAN."
    )
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="Ask for this login (advised with --listen).")
    parser.add_argument("--outputs", default="outputs", help="Folder for adapters, runs, uploads and images.")
    parser.add_argument("--base", help="Base model to start with (default: the bundled demo model).")
    args = parser.parse_args(argv)
    try:
        check_stack()
    except StackError as error:
        parser.exit(2, f"sdlora: error: {error}\n")
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth must look like USER:PASSWORD.")
        auth = (user, password)
    if args.listen and auth is None:
        print(
            "Warning: --listen without --auth lets anyone on the network train, generate and delete adapters.",
            file=sys.stderr,
        )
    launch(args.host, args.port, args.listen, auth, args.outputs, args.base)


if __name__ == "__main__":
    main()
