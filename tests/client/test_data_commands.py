"""`raresignal series`, `export`, `compare` and `report` against a real server and
straight from the SQLite file that server writes, and the `ListSeries` pages they follow."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cli_runner import SERVER_EXTRA_AND_TORCH, cli_without
from reporting import SampleSpec, report_run

from raresignal.client.cli import main
from raresignal.client.db_reader import DatabaseSource
from raresignal.client.paging import follow_pages
from raresignal.client.sources import RunSource, ServerSource
from raresignal.protos.v1 import alerts_pb2, alerts_pb2_grpc
from raresignal.server.serving.app import ServerConfig, ServerHandle, start_in_thread

RARE = {"probe": "rare"}
COMMON = {"probe": "common"}
STEPS = range(10)


def _baseline() -> list[SampleSpec]:
    return [spec for step in STEPS for spec in (
        ("probe_accuracy", step, 0.5 + 0.05 * step, RARE),
        ("probe_accuracy", step, 0.9, COMMON),
        ("sharpness_ratio", step, 0.4),
        ("loss", step, 2.0 - 0.1 * step))]


def _collapsing() -> list[SampleSpec]:
    # The rare probe is learned, then lost; a non-finite gradient at step 5 fires an alert.
    return [spec for step in STEPS for spec in (
        ("probe_accuracy", step, 0.9 if step < 5 else 0.1, RARE),
        ("probe_accuracy", step, 0.95, COMMON),
        ("probe_retention", step, 1.0 - 0.1 * step, RARE),
        ("sharpness_ratio", step, 0.5 + 0.1 * step),
        ("loss", step, 1.0))] + [("nonfinite_values", 5, 3.0)]


@dataclass(frozen=True)
class Stored:
    server: ServerHandle
    db: Path
    baseline: str
    collapsing: str


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    folder = tmp_path_factory.mktemp("data-commands")
    db = folder / "raresignal.db"
    config = ServerConfig(db_path=str(db), host="127.0.0.1", grpc_port=0, metrics_port=0,
                          health_port=0)
    with start_in_thread(config) as server:
        baseline = report_run(server.grpc_target, "baseline", _baseline(), finished=True)
        collapsing = report_run(server.grpc_target, "exp-1", _collapsing())
        yield Stored(server, db, baseline, collapsing)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _sources(stored: Stored) -> list[tuple[str, ...]]:
    """The options that name the server, and those that name its file."""
    return [("--server", stored.server.grpc_target), ("--db", str(stored.db))]


def test_series_prints_one_series_as_a_table_or_csv(
        stored: Stored, capsys: pytest.CaptureFixture[str]) -> None:
    for source in _sources(stored):
        code, out, err = _run(capsys, "series", "exp-1", "probe_accuracy", "--label",
                              "probe=rare", "--since", "4", *source)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["STEP", "VALUE", "TIME"]
        assert [(row.split()[0], row.split()[1]) for row in lines[1:]] == \
            [("4", "0.9")] + [(str(step), "0.1") for step in range(5, 10)]

        code, out, err = _run(capsys, "series", stored.baseline, "loss", "--csv", *source)
        assert code == 0, err
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [int(r["step"]) for r in rows] == list(STEPS)
        assert [float(r["value"]) for r in rows] == [2.0 - 0.1 * step for step in STEPS]
        assert {r["metric"] for r in rows} == {"loss"} and {r["labels"] for r in rows} == {""}


def test_series_names_the_label_sets_a_labelled_metric_has(
        stored: Stored, capsys: pytest.CaptureFixture[str]) -> None:
    for source in _sources(stored):
        code, _, err = _run(capsys, "series", "exp-1", "probe_accuracy", *source)
        assert code == 2
        assert "probe_accuracy{probe=common}, probe_accuracy{probe=rare}" in err
        assert "--label" in err
        code, _, err = _run(capsys, "series", "no-such-run", "loss", *source)
        assert code == 2 and "no run has the id or name 'no-such-run'" in err
        code, _, err = _run(capsys, "series", "exp-1", "loss", "--label", "probe", *source)
        assert code == 2 and "key=value" in err


Row = tuple[str, tuple[tuple[str, str], ...], int, float]


def _row(metric: str, labels: dict[str, str], step: int, value: float) -> Row:
    return metric, tuple(sorted(labels.items())), step, value


def _expected_samples(specs: list[SampleSpec]) -> list[Row]:
    return sorted(_row(spec[0], spec[3] if len(spec) == 4 else {}, spec[1], spec[2])
                  for spec in specs)


def test_export_writes_every_sample_of_every_series(
        stored: Stored, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = _expected_samples(_collapsing())
    exported: dict[str, str] = {}
    for source in _sources(stored):
        out_file = tmp_path / f"{source[0].strip('-')}.csv"
        code, _, err = _run(capsys, "export", "exp-1", "--out", str(out_file), *source)
        assert code == 0, err
        assert f"wrote {len(expected)} samples of run exp-1" in err
        rows = list(csv.DictReader(out_file.open()))
        labels = [dict(pair.split("=") for pair in r["labels"].split(",") if pair)
                  for r in rows]
        assert sorted(_row(r["metric"], label, int(r["step"]), float(r["value"]))
                      for r, label in zip(rows, labels, strict=True)) == expected
        code, out, err = _run(capsys, "export", "exp-1", "--format", "jsonl", *source)
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert sorted(_row(r["metric"], r["labels"], r["step"], r["value"])
                      for r in lines) == expected
        assert all(r["wall_time"] == 1_700_000_000.0 + r["step"] for r in lines)
        exported[source[0]] = out
    assert exported["--server"] == exported["--db"]


def test_compare_puts_runs_side_by_side(stored: Stored,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    for source in _sources(stored):
        code, out, err = _run(capsys, "compare", "baseline", "exp-1", *source)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["SERIES", "baseline", "LAST", "baseline", "MIN",
                                    "baseline", "MAX", "exp-1", "LAST", "exp-1", "MIN",
                                    "exp-1", "MAX"]
        rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
        # The default metrics, in their order; loss is not among them.
        assert list(rows) == ["probe_accuracy{probe=common}", "probe_accuracy{probe=rare}",
                              "probe_retention{probe=rare}", "sharpness_ratio"]
        assert rows["probe_accuracy{probe=rare}"] == ["0.95", "0.5", "0.95", "0.1", "0.1",
                                                      "0.9"]
        assert rows["probe_retention{probe=rare}"] == ["-", "-", "-", "0.1", "0.1", "1"]
        code, out, err = _run(capsys, "compare", stored.baseline, "exp-1", "--metric", "loss",
                              *source)
        assert code == 0, err
        assert out.splitlines()[1].split() == ["loss", "1.1", "1.1", "2", "1", "1", "1"]


def test_the_file_reader_answers_as_the_server_does(stored: Stored) -> None:
    """The client reads the server's SQLite schema itself: if the two drift apart, this
    fails."""
    with grpc.insecure_channel(stored.server.grpc_target) as channel:
        sources: list[RunSource] = [ServerSource(channel), DatabaseSource(str(stored.db))]
        answers = []
        for source in sources:
            runs = source.runs()
            answer: list[object] = [runs]
            for run in runs:
                series = source.series(run.run_id)
                answer += [series, source.alerts(run.run_id)]
                answer += [source.samples(run.run_id, s.metric, s.labels, since_step=3)
                           for s in series]
            answers.append(answer)
        sources[1].close()
    assert [run.run_name for run in answers[0][0]] == ["baseline", "exp-1"]  # type: ignore[attr-defined]
    assert any(answer for answer in answers[0][1:]), "nothing was compared"
    assert answers[0] == answers[1]


def test_list_series_pages(stored: Stored) -> None:
    with grpc.insecure_channel(stored.server.grpc_target) as channel:
        stub = alerts_pb2_grpc.RunsStub(channel)

        def page(token: str, page_size: int, run_id: str = stored.collapsing
                 ) -> alerts_pb2.ListSeriesResponse:
            return stub.ListSeries(alerts_pb2.ListSeriesRequest(
                run_id=run_id, page_size=page_size, page_token=token), timeout=10)

        every = page("", 0).series
        assert [(s.metric, dict(s.labels)) for s in every] == [
            ("loss", {}), ("nonfinite_values", {}), ("probe_accuracy", COMMON),
            ("probe_accuracy", RARE), ("probe_retention", RARE), ("sharpness_ratio", {})]
        first = page("", 2)
        assert len(first.series) == 2 and first.next_page_token
        assert list(follow_pages(lambda token, _: (lambda r: (r.series, r.next_page_token))(
            page(token, 2)))) == list(every)
        with pytest.raises(grpc.RpcError) as elsewhere:
            page(first.next_page_token, 2, run_id=stored.baseline)
        assert elsewhere.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as unknown:
            page("", 0, run_id="0" * 16)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as malformed:
            page("", 0, run_id="not a run id")
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_report_writes_a_png_and_a_page_with_its_alerts(
        stored: Stored, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    for source in _sources(stored):
        out = tmp_path / source[0].strip("-")
        code, printed, err = _run(capsys, "report", "exp-1", "--out", str(out), *source)
        assert code == 0, err
        png = (out / "report.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
        page = (out / "report.html").read_text()
        assert 'src="data:image/png;base64,' in page and "<table>" in page
        assert "NonFiniteGradients" in page and stored.collapsing in page
        assert str(out / "report.html") in printed
        code, _, err = _run(capsys, "report", "baseline", "--out", str(out / "b"), *source)
        assert code == 0, err
        assert "No alerts." in (out / "b" / "report.html").read_text()


def test_the_file_needs_only_the_core_install_and_the_report_names_its_extra(
        stored: Stored, tmp_path: Path) -> None:
    exported = cli_without(SERVER_EXTRA_AND_TORCH, "export", "exp-1", "--db", str(stored.db))
    assert exported.returncode == 0, exported.stderr
    assert len(exported.stdout.splitlines()) == len(_collapsing()) + 1  # and the header
    report = cli_without(("matplotlib",), "report", "exp-1", "--out", str(tmp_path),
                         "--db", str(stored.db))
    assert report.returncode == 2
    assert "pip install 'raresignal[demo]'" in report.stderr
    assert not list(tmp_path.iterdir())


def test_reading_a_file_leaves_the_database_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "closed.db"
    config = ServerConfig(db_path=str(db), host="127.0.0.1", grpc_port=0, metrics_port=0,
                          health_port=0)
    with start_in_thread(config) as server:
        report_run(server.grpc_target, "exp-1", _collapsing())
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for argv in (["export", "exp-1"], ["compare", "exp-1"], ["series", "exp-1", "loss"]):
        code, out, err = _run(capsys, *argv, "--db", str(db))
        assert code == 0 and out, err
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


def test_a_file_that_is_no_server_database_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.db").write_text("not a database")
    (tmp_path / "empty.db").write_bytes(b"")
    for path in (tmp_path / "notes.db", tmp_path / "empty.db", tmp_path / "missing.db"):
        code, _, err = _run(capsys, "series", "exp-1", "loss", "--db", str(path))
        assert code == 2 and str(path) in err
    code, _, err = _run(capsys, "series", "exp-1", "loss", "--db",
                        "postgresql://rs@db:5432/raresignal")
    assert code == 2 and "--server" in err


def test_each_data_command_teaches_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("series", "export", "compare", "report"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        helped = capsys.readouterr().out
        assert "examples:" in helped and f"raresignal {command} " in helped
        assert "--db" in helped and "--server" in helped

