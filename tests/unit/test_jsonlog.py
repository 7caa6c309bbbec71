"""The JSON-lines log observer (``twistd --logger=sna.logging.json_observer``) and ``printable``.

Events are made by real ``twisted.logger`` Loggers (and the legacy
``twisted.python.log`` bridge) and read back from the text the observer
wrote, line by line, as a journald or Loki user would read them.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.logger._legacy import publishToNewObserver
from twisted.python import log as legacy_log
from twisted.python.failure import Failure

from sna.logging import JsonLinesObserver, event_record, json_observer, printable


class Thing:
    """An object with Python's default repr, as log calls must not show."""


def logged(emit: Any) -> list[dict[str, Any]]:
    """Every line the observer wrote while ``emit(logger)`` ran, parsed."""
    out = io.StringIO()
    publisher = LogPublisher(JsonLinesObserver(out))
    emit(Logger(namespace="sna.test", observer=publisher))
    text = out.getvalue()
    assert text.endswith("\n")
    assert text.isascii()
    return [json.loads(line) for line in text.splitlines()]


def test_one_object_per_event_with_time_level_namespace_and_message() -> None:
    [record] = logged(lambda log: log.warn("job {job_id}: cancel requested", job_id="j 1"))
    assert record["level"] == "warn"
    assert record["namespace"] == "sna.test"
    assert record["message"] == "job j 1: cancel requested"
    assert record["fields"] == {"job_id": "j 1"}
    assert set(record) == {"time", "level", "namespace", "message", "fields"}


def test_time_is_rfc3339_utc_with_milliseconds() -> None:
    assert event_record({"log_time": 0.0})["time"] == "1970-01-01T00:00:00.000Z"
    assert event_record({"log_time": 1796166100.9996})["time"] == "2026-12-01T23:01:40.999Z"


def test_only_plain_json_fields_are_kept() -> None:
    [record] = logged(
        lambda log: log.info(
            "{count} disk(s)",
            count=2,
            ratio=0.5,
            ok=True,
            nothing=None,
            ports=(10100, 10101),
            disks=[{"key": 2000, "change_id": "52 aa/3"}],
            thing=Thing(),
            raw=b"bytes",
            mixed=[1, Thing()],
            keyed={1: "not a string key"},
            infinite=math.inf,
        )
    )
    assert record["fields"] == {
        "count": 2,
        "ratio": 0.5,
        "ok": True,
        "nothing": None,
        "ports": [10100, 10101],
        "disks": [{"key": 2000, "change_id": "52 aa/3"}],
    }


def test_fields_named_like_secrets_are_never_written() -> None:
    [record] = logged(
        lambda log: log.info(
            "login as {user}",
            user="administrator@vsphere.local",
            vcenter_password="hunter2",
            auth_token="t0ken",
            request={"vm": "pgtest1", "Password": "hunter2"},
        )
    )
    assert record["fields"] == {"user": "administrator@vsphere.local", "request": {"vm": "pgtest1"}}
    line = json.dumps(record)
    assert "hunter2" not in line and "t0ken" not in line


def test_a_failure_adds_its_type_message_and_traceback() -> None:
    def emit(log: Logger) -> None:
        try:
            raise ValueError("the SHA answered nonsense")
        except ValueError:
            log.failure("job {job_id}: telling the SHA", job_id="j1")

    [record] = logged(emit)
    assert record["level"] == "critical"
    assert record["message"] == "job j1: telling the SHA"
    assert record["fields"] == {"job_id": "j1"}
    error = record["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "the SHA answered nonsense"
    assert error["traceback"].startswith("Traceback (most recent call last):")
    assert "ValueError: the SHA answered nonsense" in error["traceback"]


def test_an_exception_class_outside_builtins_is_named_with_its_module() -> None:
    failure = Failure(json.JSONDecodeError("no", "x", 0))
    record = event_record({"log_failure": failure, "log_format": "parse"})
    assert record["error"]["type"] == "json.decoder.JSONDecodeError"


def test_legacy_events_carry_their_text_not_their_bookkeeping() -> None:
    out = io.StringIO()
    observer = JsonLinesObserver(out)
    event = {"message": ("Received SIGTERM, shutting down.",), "isError": 0, "system": "-"}
    event["time"] = 1796166100.0
    publishToNewObserver(observer, event, legacy_log.textFromEventDict)
    [record] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert record["message"] == "Received SIGTERM, shutting down."
    assert record["level"] == "info"
    assert record["time"] == "2026-12-01T23:01:40.000Z"
    assert "fields" not in record


def test_a_new_event_keeps_a_field_named_like_a_legacy_key() -> None:
    [record] = logged(lambda log: log.info("probe failed: {message}", message="refused"))
    assert record["fields"] == {"message": "refused"}
    assert record["message"] == "probe failed: refused"


def test_non_ascii_and_control_characters_stay_inside_one_line() -> None:
    [record] = logged(
        lambda log: log.info("job {job_id} done", job_id="SQL Server 01 \u00fcber\n2026 forged")
    )
    assert record["message"] == "job SQL Server 01 \u00fcber\n2026 forged done"


def test_the_twistd_factory_writes_to_standard_output(capsys: Any) -> None:
    observer = json_observer()
    assert ILogObserver.providedBy(observer)
    observer(
        {"log_format": "sna {version} started", "version": "1.4.0", "log_level": LogLevel.info}
    )
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["message"] == "sna 1.4.0 started"


def test_printable_escapes_control_characters_and_keeps_the_rest() -> None:
    assert printable("52 66 8c/5440") == "52 66 8c/5440"
    assert printable("a\r\nb\x1b[31m\u2028\u00e9") == "a\\x0d\\x0ab\\x1b[31m\\u2028\u00e9"
    assert printable("") == ""


def test_printable_shows_bytes_without_python_s_b_quote() -> None:
    assert printable(b"HTTP/1.1 400 Bad\r\n\xff") == "HTTP/1.1 400 Bad\\x0d\\x0a\\xff"
