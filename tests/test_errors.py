"""The workbench's error helpers (core.errors)."""

from __future__ import annotations

import pytest

from tts_workbench.core.errors import CacheError, ConfigError, error_line, naming_flag


def test_naming_flag_puts_the_flag_in_front_and_keeps_the_type() -> None:
    with pytest.raises(CacheError) as caught, naming_flag("--tokens", CacheError, ConfigError):
        raise CacheError("too long: use fewer")
    assert str(caught.value) == "argument --tokens: too long: use fewer"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_naming_flag_lets_other_errors_through_unchanged() -> None:
    with pytest.raises(ConfigError, match="^unknown step$"), naming_flag("--tokens", CacheError):
        raise ConfigError("unknown step")


def test_error_line_is_the_first_line_that_says_something() -> None:
    assert error_line(RuntimeError("\n  shapes differ\nsee the docs")) == "RuntimeError: shapes differ"
    assert error_line(RuntimeError("\n  shapes differ\n"), named=False) == "shapes differ"
    assert error_line(AssertionError()) == "AssertionError"  # a bare assert: its type says what failed
    assert error_line(AssertionError("  "), named=False) == "AssertionError"
