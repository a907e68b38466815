"""Built-in mock LLM provider: deterministic OpenAI- and Anthropic-compatible endpoints.

Standalone (no Django): `python -m routing.mockprovider --host 127.0.0.1 --port 9100`.
Per-request options come from `x-mock-*` headers, then `model+key=value` directives,
then the server's command-line defaults; see `options.MockOptions`.
"""

from .options import MockOptions, OptionError, resolve_options
from .server import create_app, serve

__all__ = ["MockOptions", "OptionError", "create_app", "resolve_options", "serve"]
