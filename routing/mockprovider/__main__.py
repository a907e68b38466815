"""Command line: `python -m routing.mockprovider --host H --port P [defaults]`."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .options import PARSERS, MockOptions, OptionError
from .server import serve


def _argument_type(field: str) -> Callable[[str], object]:
    """Return an argparse type parsing `field` exactly as headers and directives do."""
    parse = PARSERS[field]

    def convert(raw: str) -> object:
        try:
            return parse(raw)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = field
    return convert


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Return the parsed command line; option flags become the server defaults."""
    parser = argparse.ArgumentParser(
        prog="python -m routing.mockprovider",
        description="Deterministic OpenAI- and Anthropic-compatible mock LLM provider.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")
    parser.add_argument("--require-key", default=None, help="answer 401 without this API key")
    for field in PARSERS:
        parser.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            type=_argument_type(field),
            default=argparse.SUPPRESS,
            help=f"default {field} (overridable per request)",
        )
    return parser.parse_args(argv)


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def main(argv: Sequence[str] | None = None) -> None:
    """Start the mock provider and serve until SIGTERM or SIGINT."""
    args = parse_args(argv)
    overrides = {field: getattr(args, field) for field in PARSERS if hasattr(args, field)}
    defaults = dataclasses.replace(MockOptions(), **overrides)
    _run(
        serve(
            host=args.host,
            port=args.port,
            defaults=defaults,
            required_key=args.require_key,
        )
    )


if __name__ == "__main__":
    main()
