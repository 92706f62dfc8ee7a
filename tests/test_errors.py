"""The workbench's error helpers (core.errors)."""

from __future__ import annotations

import pytest

from tts_workbench.core.errors import CacheError, ConfigError, naming_flag


def test_naming_flag_puts_the_flag_in_front_and_keeps_the_type() -> None:
    with pytest.raises(CacheError) as caught, naming_flag("--tokens", CacheError, ConfigError):
        raise CacheError("too long: use fewer")
    assert str(caught.value) == "argument --tokens: too long: use fewer"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_naming_flag_lets_other_errors_through_unchanged() -> None:
    with pytest.raises(ConfigError, match="^unknown step$"), naming_flag("--tokens", CacheError):
        raise ConfigError("unknown step")
