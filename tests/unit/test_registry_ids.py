"""Edit-model IDs: opaque, URL-safe, strictly validated before any I/O."""

from __future__ import annotations

import re

import pytest

from forgedit.errors import InvalidInputError
from registry.errors import InvalidEditModelIdError
from registry.ids import (
    EDIT_MODEL_ID_LENGTH,
    is_edit_model_id,
    new_edit_model_id,
    validate_edit_model_id,
)

BAD_IDS = [
    "",
    "../../etc/passwd",
    "em_../../../../etc/passwd",
    "em_" + "a" * 25,
    "em_" + "a" * 27,
    "em_" + "A" * 26,  # uppercase is not issued
    "em_" + "a" * 25 + "1",  # 1 is not base32
    "em_" + "a" * 25 + "/",
    "em_" + "a" * 25 + "\n",
    "em_" + "a" * 25 + "é",
    "em_" + "а" * 26,  # Cyrillic a
    "em_" + "a" * 26 + "\x00",
    " em_" + "a" * 26,
    "EM_" + "a" * 26,
    "x" * 10_000,
    "em_aaaaaaaaaaaaaaaaaaaaaaaaaa' or '1'='1",
]


def test_new_ids_are_valid_url_safe_and_unique() -> None:
    ids = {new_edit_model_id() for _ in range(2000)}
    assert len(ids) == 2000
    for i in ids:
        assert len(i) == EDIT_MODEL_ID_LENGTH
        assert re.fullmatch(r"em_[a-z2-7]{26}", i)
        assert validate_edit_model_id(i) == i
        assert is_edit_model_id(i)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_malformed_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidEditModelIdError) as info:
        validate_edit_model_id(bad)
    assert not is_edit_model_id(bad)
    err = info.value
    assert isinstance(err, InvalidInputError) and err.field == "edit_model_id"
    message = str(err)
    assert "em_" in message and "a-z or 2-7" in message
    assert len(message) < 300  # a hostile value is never echoed in full
    assert "\n" not in message and "\x00" not in message


@pytest.mark.parametrize("bad", [None, 42, b"em_" + b"a" * 26, ["em_"]])
def test_non_strings_are_refused(bad: object) -> None:
    with pytest.raises(InvalidEditModelIdError, match="of type"):
        validate_edit_model_id(bad)
