"""Settings refuse what would leave a screening site open or misconfigured."""

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_no_api_key_is_refused_unless_auth_is_switched_off_explicitly(monkeypatch):
    monkeypatch.delenv("CERVIXQC_API_KEYS", raising=False)
    with pytest.raises(ValidationError, match="no API key"):
        Settings()
    assert Settings(auth_disabled=True).api_keys == []


@pytest.mark.parametrize("key", ["changeme", "short-key"])
def test_placeholder_and_short_keys_are_refused(key):
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(api_keys=key)


def test_lists_come_comma_separated_from_the_environment(monkeypatch, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# site keys\nfile-key-0123456789abcdef\n")
    monkeypatch.setenv("CERVIXQC_API_KEYS", "env-key-0123456789abcdef, env-key-fedcba9876543210")
    monkeypatch.setenv("CERVIXQC_API_KEYS_FILE", str(key_file))
    monkeypatch.setenv("CERVIXQC_DATA_ROOTS", f"{tmp_path}/a,{tmp_path}/b")
    s = Settings()
    assert s.api_keys == ["env-key-0123456789abcdef", "env-key-fedcba9876543210", "file-key-0123456789abcdef"]
    assert s.data_roots == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
