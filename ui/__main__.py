"""`python -m ui`: serve the app (on 127.0.0.1:7860 unless told otherwise)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from sdlora.access import (
    AUTH_ENV,
    AccessError,
    Credentials,
    allowed_host_names,
    credentials_from_env,
    hash_password,
    load_auth_file,
)
from sdlora.compat import StackError, check_stack
from sdlora.outputs import Outputs
from ui.app import DEFAULT_HOST, DEFAULT_PORT, launch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ui", description="The sdlora web app.")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"Address to serve on (default {DEFAULT_HOST}).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port (default {DEFAULT_PORT}).")
    parser.add_argument(
        "--listen", action="store_true", help="Serve on all interfaces (0.0.0.0), e.g. on a LAN."
    )
    login = parser.add_mutually_exclusive_group()
    login.add_argument(
        "--auth-file",
        metavar="FILE",
        help="Ask for a login from FILE: one USER:PASSWORD per line, the password plain or hashed "
        f"(see --hash-password). Or set {AUTH_ENV}=USER:PASSWORD. Advised with --listen.",
    )
    login.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help="Ask for this login. Other local users can read it in the process list: prefer --auth-file.",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="Also answer requests for this host name (e.g. the name a TLS proxy in front uses); repeatable.",
    )
    parser.add_argument(
        "--hash-password",
        metavar="USER",
        help="Ask for a password and print the USER:... line for an auth file, then exit.",
    )
    parser.add_argument("--outputs", default="outputs", help="Folder for adapters, runs, uploads and images.")
    parser.add_argument("--base", help="Base model to start with (default: the bundled demo model).")
    args = parser.parse_args(argv)
    if args.hash_password:
        password = getpass.getpass(f"Password for {args.hash_password}: ")
        if not password or password != getpass.getpass("Again: "):
            parser.exit(2, "sdlora: error: the passwords differ or are empty.\n")
        print(f"{args.hash_password}:{hash_password(password)}")
        return
    try:
        check_stack()
    except StackError as error:
        parser.exit(2, f"sdlora: error: {error}\n")
    try:
        auth = login_from(args)
        allowed = allowed_host_names(args.allowed_host)
    except AccessError as error:
        parser.exit(2, f"sdlora: error: {error}\n")
    # The server's upload cache in the outputs folder, its own, so start-up can clean what a killed one
    # left (Gradio's default, /tmp/gradio, is shared with other apps).
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Outputs(args.outputs).upload_cache.resolve()))
    launch(args.host, args.port, args.listen, auth, args.outputs, args.base, allowed_hosts=allowed)


def login_from(args: argparse.Namespace) -> Credentials | None:
    """The login asked for: --auth-file, else --auth, else SDLORA_AUTH; None for none."""
    if args.auth_file:
        return load_auth_file(args.auth_file)
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise AccessError("--auth must look like USER:PASSWORD.")
        print(
            f"Note: --auth shows the password to every local user; prefer --auth-file or {AUTH_ENV}.",
            file=sys.stderr,
        )
        return Credentials({user: password})
    return credentials_from_env()


if __name__ == "__main__":
    main()
