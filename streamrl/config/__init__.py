"""Typed configuration: flags declared once in `flags.py`, parsed and validated in `parser.py`."""

from streamrl.config.parser import ConfigError, build_parser, default_args, parse_args, validate

__all__ = ["ConfigError", "build_parser", "default_args", "parse_args", "validate"]
