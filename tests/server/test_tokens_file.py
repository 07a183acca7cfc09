"""The tokens file and RARESIGNAL_TOKENS are strict: anything but the documented formats is
a TokensError that says where, and no message shows any part of a token."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from raresignal.server.serving.auth import (
    TokensError,
    TokenStore,
    load_tokens,
    parse_tokens,
    parse_tokens_env,
)

SECRET = "Zq9secretXY"  # every bad entry below holds this, so a leak of any part shows


def _leaks(message: str) -> bool:
    return any(SECRET[i:i + 3] in message for i in range(len(SECRET) - 2))


BAD_FILES = [
    (f"- {SECRET}\n- other\n", "tokens: a YAML list"),
    (f"ok: ['*']\n{SECRET}: []\n", "entry 2 (line 2): the token needs a list"),
    (f"{SECRET}:\n", "entry 1 (line 1): the token needs a list"),
    (f"{SECRET}: {{a: b}}\n", "entry 1 (line 1): the token needs a list"),
    (f"{SECRET}: ['ok', '']\n", "entry 1 (line 1): glob 1 must be a non-empty string"),
    (f"{SECRET}: [1]\n", "glob 0 must be a non-empty string, got 1"),
    ("9876543210: ['*']\n", "entry 1 (line 1): the token must be a string (quote it), got int"),
    ("'': ['*']\n", "entry 1 (line 1): the token is empty"),
    (f"'{SECRET} x': ['*']\n", "the token holds whitespace or control characters"),
    (f"ok: ['*']\n\n{SECRET}: [a]\n{SECRET}: [b]\n", "entry 3 (line 4): the token is listed "
                                                      "twice"),
    (f'{{"{SECRET}": []}}', "entry 1 (line 1): the token needs a list"),
    (f"{SECRET}: !!python/name:os.system ['*']\n", "entry 1 (line 1): not plain YAML data"),
    (f"{SECRET} a\n{SECRET} b\n", "tokens:2: the token is listed twice"),
    (f"# only\n{SECRET}: [a\n", "tokens:2: write 'token glob ...' or a YAML mapping"),
    ("# nothing here\n", "tokens: no tokens found"),
    ("{}", "tokens: no tokens found"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_tokens_files_name_the_entry_and_never_the_token(text: str, message: str) -> None:
    with pytest.raises(TokensError) as raised:
        parse_tokens(text)
    assert message in str(raised.value)
    assert not _leaks(str(raised.value)), raised.value


@pytest.mark.parametrize(("value", "message"), [
    (f"ok,={SECRET}", "entry 2: the token is empty"),
    (f"{SECRET}=", "entry 1: the token needs a list"),
    (f"{SECRET}=a,{SECRET}=b", "entry 2: the token is listed twice"),
    (f"[{SECRET}]", "RARESIGNAL_TOKENS: a YAML list"),
    (f"{{{SECRET}: []}}", "RARESIGNAL_TOKENS: entry 1 (line 1): the token needs a list"),
    (" , ", "RARESIGNAL_TOKENS holds no tokens"),
])
def test_bad_tokens_variable_names_the_entry_and_never_the_token(value: str,
                                                                 message: str) -> None:
    with pytest.raises(TokensError) as raised:
        parse_tokens_env(value)
    assert message in str(raised.value)
    assert not _leaks(str(raised.value)), raised.value


def test_good_files_keep_their_meaning(tmp_path: Path) -> None:
    file = tmp_path / "tokens.yaml"
    file.write_text(f"{SECRET}: ['teamA-*', shared]\n'12345': '*'\n")
    assert load_tokens(file) == {SECRET: ["teamA-*", "shared"], "12345": ["*"]}


def test_the_server_command_refuses_a_bad_file_without_showing_the_token(
        tmp_path: Path) -> None:
    file = tmp_path / "tokens.yaml"
    file.write_text(f"- {SECRET}\n")
    result = subprocess.run(
        [sys.executable, "-m", "raresignal.server.cli", "server", "--tokens-file", str(file),
         "--db", ":memory:", "--grpc-port", "0", "--metrics-port", "0", "--health-port", "0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{file}: a YAML list" in result.stderr
    assert not _leaks(result.stdout + result.stderr)


def test_the_token_store_logs_nothing_of_a_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store = TokenStore({SECRET: ["*"]})
    assert not store.is_open
    assert not any(_leaks(record.getMessage()) for record in caplog.records)
