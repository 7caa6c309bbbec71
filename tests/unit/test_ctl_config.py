"""Where sna-ctl finds the daemon and its token: options, then environment, then a config file."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sna.ctl import cli
from sna.ctl.config import DEFAULT_URL, UsageError, resolve

TOKEN = "tok-3f9a1c"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """An environment whose home has no config (and /etc/sna/ctl.conf is not ours to write)."""
    return {"HOME": str(tmp_path / "home")}


def test_defaults(home: dict[str, str]) -> None:
    settings = resolve(environ=home)
    assert (settings.url, settings.token, settings.insecure) == (DEFAULT_URL, None, False)


def test_options_win_over_the_environment_which_wins_over_the_file(
    tmp_path: Path, home: dict[str, str]
) -> None:
    config = write(
        tmp_path / "ctl.conf",
        "[sna-ctl]\nurl = http://127.0.0.1:9001\ntoken_file = file-token\ntimeout = 7\n",
    )
    write(tmp_path / "file-token", "from-file\n")
    env_token = write(tmp_path / "env-token", "from-env-file\nsecond line\n")
    option_token = write(tmp_path / "option-token", "  from-option  \n")
    from_file = resolve(config=str(config), environ=home)
    assert (from_file.url, from_file.token, from_file.timeout) == (
        "http://127.0.0.1:9001",
        "from-file",
        7.0,
    )
    environ = {**home, "SNA_URL": "http://127.0.0.1:9002/", "SNA_TOKEN_FILE": str(env_token)}
    from_env = resolve(config=str(config), environ=environ)
    assert (from_env.url, from_env.token) == ("http://127.0.0.1:9002", "from-env-file")
    from_options = resolve(
        url="https://localhost:9003",
        token_file=str(option_token),
        config=str(config),
        environ=environ,
    )
    assert (from_options.url, from_options.token) == ("https://localhost:9003", "from-option")
    # SNA_TOKEN is the environment's second way, after SNA_TOKEN_FILE.
    assert resolve(environ={**home, "SNA_TOKEN": TOKEN}).token == TOKEN
    both = {**home, "SNA_TOKEN": TOKEN, "SNA_TOKEN_FILE": str(env_token)}
    assert resolve(environ=both).token == "from-env-file"


def test_the_token_never_shows_in_a_repr(home: dict[str, str]) -> None:
    settings = resolve(environ={**home, "SNA_TOKEN": TOKEN})
    assert TOKEN not in repr(settings)
    assert settings.token_source == "SNA_TOKEN"


def test_the_config_file_is_searched_for(tmp_path: Path) -> None:
    xdg = write(tmp_path / "xdg" / "sna" / "ctl.conf", "[sna-ctl]\nurl = http://127.0.0.1:9101\n")
    write(tmp_path / "home" / ".config" / "sna" / "ctl.conf", "[sna-ctl]\nurl = http://h:1\n")
    environ = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(xdg.parents[1])}
    settings = resolve(environ=environ)
    assert (settings.url, settings.config_file) == ("http://127.0.0.1:9101", str(xdg))
    assert resolve(environ={"HOME": str(tmp_path / "home")}).url == "http://h:1"


def test_paths_in_the_config_file_are_relative_to_it(tmp_path: Path, home: dict[str, str]) -> None:
    config = write(
        tmp_path / "etc" / "ctl.conf", "[sna-ctl]\ntoken_file = token\nca_file = ca.pem\n"
    )
    write(tmp_path / "etc" / "token", TOKEN + "\n")
    write(tmp_path / "etc" / "ca.pem", "-----BEGIN CERTIFICATE-----\n")
    settings = resolve(config=str(config), environ=home)
    assert settings.token == TOKEN
    assert settings.ca_file == str(tmp_path / "etc" / "ca.pem")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sna-ctl]\ntokenfile = x\n", "unknown key 'tokenfile' in [sna-ctl]"),
        ("[sna-ctl]\nurl = ftp://x\n", "url: the daemon's URL must be http://HOST:PORT"),
        ("[sna-ctl]\ninsecure = maybe\n", "insecure must be true or false, not 'maybe'"),
        ("[sna-ctl]\ntimeout = 0\n", "timeout must be a number of seconds above 0"),
        ("not an ini file\n", "cannot read the config file"),
    ],
)
def test_a_bad_config_file_is_named_with_the_reason(
    tmp_path: Path, home: dict[str, str], text: str, message: str
) -> None:
    config = write(tmp_path / "ctl.conf", text)
    with pytest.raises(UsageError, match=re.escape(message)) as e:
        resolve(config=str(config), environ=home)
    assert str(config) in str(e.value)


def test_token_files_that_cannot_serve(tmp_path: Path, home: dict[str, str]) -> None:
    empty = write(tmp_path / "empty", "\n" + TOKEN)
    with pytest.raises(UsageError, match="holds no token"):
        resolve(token_file=str(empty), environ=home)
    with pytest.raises(UsageError, match=r"--token-file: cannot read the token file .*missing"):
        resolve(token_file=str(tmp_path / "missing"), environ=home)
    with pytest.raises(UsageError, match=r"--config .*: no such file"):
        resolve(config=str(tmp_path / "nope.conf"), environ=home)


@pytest.mark.parametrize("url", ["127.0.0.1:8081", "http://", "http://h:99999", "http://h/api"])
def test_urls_must_name_only_the_daemon(url: str, home: dict[str, str]) -> None:
    with pytest.raises(UsageError, match="--url: the daemon's URL must be"):
        resolve(url=url, environ=home)


def test_there_is_no_option_that_takes_the_token_itself(capsys: pytest.CaptureFixture[str]) -> None:
    # Not even as an abbreviation of --token-file: a token on argv is visible to all.
    for argv in (["--token", TOKEN, "health"], ["health", "--token", TOKEN]):
        with pytest.raises(SystemExit) as e:
            cli.parser().parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "unrecognized arguments: --token" in err or "invalid choice" in err, err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", "2026-11-26T11:30:00Z"),
        ("2h", "2026-11-26T10:00:00Z"),
        ("1.5d", "2026-11-25T00:00:00Z"),
        ("1w", "2026-11-19T12:00:00Z"),
        ("2026-11-20T08:15:00Z", "2026-11-20T08:15:00Z"),
        ("2026-11-20T08:15:00+01:00", "2026-11-20T07:15:00Z"),
    ],
)
def test_since_takes_relative_and_absolute_times(text: str, expected: str) -> None:
    now = datetime(2026, 11, 26, 12, 0, 0, tzinfo=UTC)
    assert cli._since(text, now) == expected


def test_since_refuses_what_it_cannot_read() -> None:
    with pytest.raises(UsageError, match="--since must be like 30m"):
        cli._since("yesterday", datetime.now(UTC))


def test_usage_errors_exit_2(tmp_path: Path, home: dict[str, str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(["health", "--token-file", str(tmp_path / "missing")], out, err, home)
    assert code == 2 and err.getvalue().startswith("sna-ctl: --token-file: cannot read")
    err = io.StringIO()
    code = cli.run(["jobs", "--since", "soon"], out, err, home)
    assert code == 2 and err.getvalue().startswith("sna-ctl: --since must be like")
    assert out.getvalue() == ""
