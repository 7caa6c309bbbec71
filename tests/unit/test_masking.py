"""The vCenter password masked in every form a line can carry it: the masker, fuzzed with
passwords of quotes, backslashes, non-ASCII and spaces, and the client's lines through the
protocol, the launcher's command line and the Go client's pushes."""

from __future__ import annotations

import json
import re
import shlex
import sys
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error as ierror
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from sna.contract.events import MASK
from sna.contract.secrets import Masker
from sna.jobs.model import PushedProgress
from sna.sbc import events
from sna.sbc.command import ClientCommand
from sna.sbc.joblog import JobLog, LogDirectory
from sna.sbc.launcher import ProcessLauncher
from sna.sbc.parse import JsonLineParser, LogrusLineParser
from sna.sbc.protocol import BackupClientProtocol
from sna.testing import FakeProcessReactor, fixed_now
from tests.unit.conftest import Harness, started
from tests.unit.test_process import REQUEST, Recorder

#: Each form as a client would print it.
FORMS: dict[str, Callable[[str], str]] = {
    "raw": lambda p: p,
    "json": json.dumps,
    "json, not ensure_ascii": lambda p: json.dumps(p, ensure_ascii=False),
    "json in json": lambda p: json.dumps(json.dumps(p)),
    "url quote": urllib.parse.quote,
    "url quote, nothing safe": lambda p: urllib.parse.quote(p, safe=""),
    "url quote_plus": urllib.parse.quote_plus,
    "url quote, lower-case hex": lambda p: re.sub(
        "%[0-9A-F]{2}", lambda m: m.group().lower(), urllib.parse.quote(p)
    ),
    "shell": shlex.quote,
    "repr": repr,
    "ascii": ascii,
    "bytes repr": lambda p: repr(p.encode("utf-8")),
}


def payloads(password: str) -> dict[str, str]:
    """What of each form is the password, without the quotes around it."""
    found = {}
    for name, form in FORMS.items():
        text = form(password)
        if name in ("json", "json, not ensure_ascii", "repr", "ascii"):
            text = text[1:-1]
        elif name == "json in json":
            text = text[3:-3]
        elif name == "bytes repr":
            text = text[2:-1]
        found[name] = text
    return found


def leaks(text: str, password: str) -> list[str]:
    """The forms of ``password`` that can still be read in ``text``."""
    visible = text.replace(MASK, "\0")
    return [name for name, shown in payloads(password).items() if shown and shown in visible]


#: What the hard passwords are made of: quotes, backslashes, non-ASCII, spaces, and plain.
HARD = "\"'\\ öß€😀\t$&%/+:@*aZ09"
passwords = st.text(alphabet=st.sampled_from(list(HARD)), min_size=1, max_size=24)
#: Passwords that cannot be mistaken for a piece of the daemon's own text (a timestamp,
#: an exit code): each holds a quote, a backslash, non-ASCII and a space.
hard_passwords = st.builds(lambda a, b: f"{a}\"ö\\ {b}'", passwords, passwords)
#: Text around a password, of characters no form of one is made of.
context = st.text(alphabet="<>[]{}=;|~", max_size=8)


@settings(max_examples=1000)
@given(
    password=passwords,
    form=st.sampled_from(sorted(FORMS)),
    before=context,
    after=context,
)
def test_no_form_of_a_password_survives_masking(
    password: str, form: str, before: str, after: str
) -> None:
    shown = Masker([password])(before + FORMS[form](password) + after)
    assert MASK in shown
    assert not leaks(shown, password), shown
    assert shown.startswith(before) and shown.endswith(after)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_example_of_the_issue(form: str) -> None:
    password = 'pa"ss\\wörd'
    shown = Masker([password])(f"login failed: {FORMS[form](password)} (retrying)")
    assert not leaks(shown, password), shown
    assert shown.startswith("login failed: ") and shown.endswith(" (retrying)")


def test_text_without_the_password_is_left_alone() -> None:
    mask = Masker(["pa55 word", ""])
    assert mask('{"event":"phase","message":"pa55word pa56 word"}') == (
        '{"event":"phase","message":"pa55word pa56 word"}'
    )
    assert Masker([])("anything") == "anything"
    assert not Masker([""])


def client_lines(password: str, ascii_only: bool) -> bytes:
    """A client's output that quotes the password in its events and its log."""
    out = [
        json.dumps(
            {"event": "phase", "phase": "snapshot", "message": f"as admin/{password}"},
            ensure_ascii=ascii_only,
        ),
        json.dumps({"event": "error", "message": f"login: {password!r}"}, ensure_ascii=ascii_only),
        json.dumps({"event": "done", "message": json.dumps({"password": password})}),
    ]
    return "\n".join(out).encode() + b"\n"


def client_stderr(password: str) -> bytes:
    lines = [f"Error: https://admin:{urllib.parse.quote(password)}@vc/sdk refused"]
    lines += [f"ERROR:root:bad password {form(password)}" for form in FORMS.values()]
    return "\n".join(lines).encode() + b"\n"


@settings(max_examples=150, deadline=None)
@given(password=hard_passwords, ascii_only=st.booleans())
def test_the_protocol_masks_every_line_event_and_the_reason(
    password: str, ascii_only: bool
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "backup-j.log"
        recorder = Recorder()
        protocol = BackupClientProtocol(
            "j",
            recorder,
            JobLog(FilePath(str(log)), fixed_now),
            JsonLineParser(),
            None,
            secrets=(password,),
        )
        protocol.outReceived(client_lines(password, ascii_only))
        protocol.errReceived(client_stderr(password))
        protocol.processEnded(Failure(ierror.ProcessTerminated(exitCode=1)))
        text = log.read_text("utf-8")
    assert [type(e) for e in recorder.events] == [events.Phase, events.Error, events.Done]
    kept = [str(attrs.asdict(e)) for e in recorder.events]
    assert recorder.ended is not None and recorder.ended[2] is not None
    for shown in (text, *kept, recorder.ended[2]):
        assert not leaks(shown, password), shown


def test_the_go_clients_lines_are_masked_alike(tmp_path: Path) -> None:
    password = 'it\'s "ö" \\o/'
    recorder = Recorder()
    parser = LogrusLineParser()
    protocol = BackupClientProtocol(
        "j",
        recorder,
        JobLog(FilePath(str(tmp_path / "backup-j.log")), fixed_now),
        parser,
        parser,
        secrets=(password,),
    )
    quoted = json.dumps(f"login {password} refused", ensure_ascii=False)
    protocol.errReceived(f'time="x" level=error msg={quoted}\n'.encode())
    protocol.processEnded(Failure(ierror.ProcessTerminated(exitCode=1)))
    assert recorder.ended is not None and recorder.ended[2] is not None
    assert MASK in recorder.ended[2]
    for shown in ((tmp_path / "backup-j.log").read_text(), recorder.ended[2]):
        assert not leaks(shown, password), shown


@pytest.mark.parametrize("password", ["pa55 word", "it's", 'pa"ss\\wörd', "$(x) `y`"])
def test_the_command_line_in_the_job_log_is_masked(tmp_path: Path, password: str) -> None:
    reactor = FakeProcessReactor()
    logs = LogDirectory(FilePath(str(tmp_path)), FilePath(str(tmp_path)))
    command = ClientCommand.parse(sys.executable + " -u client.py", legacy=True)
    launcher = ProcessLauncher(reactor, reactor, command, logs, fixed_now, environ={})
    launcher.launch(attrs.evolve(REQUEST, vcenter_password=password), Recorder())
    [(_transport, args, _env)] = reactor.spawned
    assert f"--vmware-password={password}" in args  # legacy: its argv is the only way
    text = (tmp_path / "backup-backup-vm-1.log").read_text()
    assert "--vmware-password=********" in text
    assert not leaks(text, password), text


def test_the_go_clients_pushes_are_masked(harness: Harness) -> None:
    request = attrs.evolve(REQUEST, vcenter_password='s3"cr\\et ö')
    started(harness.manager, request)
    push = PushedProgress(
        stage=f"Transfer as {json.dumps(request.vcenter_password)}",
        status=f"login {urllib.parse.quote(request.vcenter_password)}",
    )
    job = harness.manager.push_progress(request.job_id, push)
    assert job.pushed is not None
    for shown in (job.pushed.stage, job.pushed.status, job.current_operation):
        assert MASK in shown
        assert not leaks(shown, request.vcenter_password), shown
