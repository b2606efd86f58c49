"""Studies on a real PostgreSQL server: search, results and report; the password kept out of what dsnas prints
and writes; an unreachable server; two drivers on one study at once.

The server is $DSNAS_TEST_POSTGRES_URL (its password in $PGPASSWORD): `eval "$(.ci/postgres)"` starts one on
loopback. Without it these tests skip, unless DSNAS_REQUIRE_POSTGRES=1 (CI), where they fail."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dsnas.cli import main

REPO = Path(__file__).resolve().parent.parent
HOW = 'start one with `eval "$(.ci/postgres)"`'


def _unavailable(why: str) -> None:
    if os.environ.get("DSNAS_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"DSNAS_REQUIRE_POSTGRES=1 but {why}; {HOW}", pytrace=False)
    pytest.skip(f"{why}; {HOW}")


def _connect(url: Any, dbname: str) -> Any:
    """A psycopg connection (autocommit) as the URL's user; the password from the URL or from PGPASSWORD."""
    import psycopg

    return psycopg.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                           dbname=dbname, connect_timeout=5, autocommit=True)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty database on the test server, dropped afterwards: each test starts from nothing."""
    base_url = os.environ.get("DSNAS_TEST_POSTGRES_URL")
    if not base_url:
        _unavailable("DSNAS_TEST_POSTGRES_URL is not set")
    from sqlalchemy.engine import make_url

    base = make_url(base_url)
    try:
        admin = _connect(base, base.database or "postgres")
    except ImportError as e:
        _unavailable(f"psycopg is not installed ({e}): pip install -e '.[postgres]'")
    except Exception as e:  # psycopg.OperationalError and friends: no server there
        _unavailable(f"cannot connect to {base.render_as_string(hide_password=True)}: {type(e).__name__}: {e}")
    name = f"dsnas_t_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            # FORCE: this process's SQLAlchemy pools may still hold connections to it.
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def with_storage(study: Path, url: str, n_trials: int | None = None) -> Path:
    """The tiny study file, stored at ``url`` (and with another budget)."""
    text = study.read_text().replace("[study]\n", f"[study]\nstorage = {json.dumps(url)}\n", 1)
    if n_trials is not None:
        text = text.replace("n_trials = 3\n", f"n_trials = {n_trials}\n")
    study.write_text(text)
    return study


def dsnas_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsnas.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def stored_trials(url: str, name: str = "tiny") -> list[Any]:
    import optuna

    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def test_search_load_and_report_on_postgresql(tiny_study, postgres_url, tmp_path, capsys):
    import pandas as pd

    import dsnas.results

    study = with_storage(tiny_study, postgres_url)
    assert main(["search", str(study)]) == 0
    assert "3 completed trials in the study" in capsys.readouterr().out
    df = dsnas.results.load(postgres_url, "tiny")
    assert len(df) == 3 and set(df["state"]) == {"COMPLETE"}
    assert df["accuracy"].notna().all() and df["throughput_tok_s"].notna().all()
    # Report and export only read: they work where every transaction is read-only (a SELECT-only role: both
    # stopped with a traceback, as opening the study wrote).
    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    with _connect(url, url.database) as conn:
        conn.execute(f"ALTER DATABASE {url.database} SET default_transaction_read_only = on")
    out = tmp_path / "report"
    assert main(["report", str(study), "--out", str(out)]) == 0
    assert "architecture" in capsys.readouterr().out
    assert len(pd.read_csv(out / "trials.csv")) == 3 and (out / "index.html").is_file()
    assert main(["export", str(study), "--pick", "knee", "--out", str(tmp_path / "knee")]) == 0
    capsys.readouterr()
    assert main(["search", str(study), "--n-trials", "4"]) == 2  # the database really is read-only: one line
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refused to store the study" in err and "read-only transaction" in err, err
    # The dashboard writes its note and charts into the study before it serves: one line, not a traceback.
    assert main(["dashboard", str(study), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refused what the dashboard writes into the study" in err, err
    assert "read-only transaction" in err and "dsnas report" in err


def test_password_in_the_study_file_is_never_printed_or_written(tiny_study, postgres_url, tmp_path, capsys,
                                                                monkeypatch):
    from urllib.parse import quote, quote_plus

    from sqlalchemy.engine import make_url

    url = make_url(postgres_url)
    password = url.password or os.environ.get("PGPASSWORD")
    if not password:
        _unavailable("the test server has no password (neither in DSNAS_TEST_POSTGRES_URL nor in PGPASSWORD)")
    # Only the URL carries the password here: the search works only if dsnas passes it on.
    monkeypatch.delenv("PGPASSWORD", raising=False)
    secret_url = url.set(password=password).render_as_string(hide_password=False)
    study = with_storage(tiny_study, secret_url)
    forms = {password, quote(password, safe=""), quote_plus(password)}  # as typed, and as written in a URL

    def assert_hidden(text: str, what: str) -> None:
        for form in forms:
            assert form not in text, f"the password appears in {what}:\n{text}"

    # An error first: the study is not in the database yet.
    assert main(["export", str(study), "--pick", "knee"]) == 2
    printed = capsys.readouterr()
    assert_hidden(printed.out + printed.err, "`dsnas export` of a study never searched (in-process)")
    assert main(["search", str(study)]) == 0
    printed = capsys.readouterr()
    assert "postgresql+psycopg://" in printed.out and "***" in printed.out  # the storage is named, masked
    assert_hidden(printed.out + printed.err, "`dsnas search` (in-process)")
    assert main(["report", str(study), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr()
    assert_hidden(printed.out + printed.err, "`dsnas report` (in-process)")

    env = {k: v for k, v in os.environ.items() if k != "PGPASSWORD"}
    for args in (["search", str(study), "--n-trials", "4"], ["report", str(study), "--out", str(tmp_path / "r2")],
                 ["--debug", "export", str(study), "--trial", "999"]):
        done = dsnas_cli(*args, env=env)
        assert_hidden(done.stdout + done.stderr, f"`dsnas {' '.join(args)}` (subprocess, exit {done.returncode})")
        assert done.returncode == (2 if "export" in args else 0), done.stderr
    for path in tmp_path.rglob("*"):  # reports, artifacts, logs: everything dsnas wrote beside the study
        if path.is_file() and path != study:
            assert_hidden(path.read_bytes().decode("utf-8", "replace"), str(path))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _SilentServer:
    """Accepts TCP connections on loopback and never answers: a server that hangs, not one that is down."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.mark.parametrize("server", ["closed port", "silent server"])
def test_unreachable_database_is_one_line_exit_2_and_quick(tiny_study, server):
    silent = _SilentServer() if server == "silent server" else None
    port = silent.port if silent else _closed_port()
    study = with_storage(tiny_study, f"postgresql+psycopg://dsnas:s3cret-pw@127.0.0.1:{port}/dsnas")
    t0 = time.monotonic()
    try:
        done = dsnas_cli("search", str(study), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`dsnas search` on a {server} still ran after 20 s")
    finally:
        if silent:
            silent.close()
    elapsed = time.monotonic() - t0
    err = done.stderr
    assert done.returncode == 2, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{err}"
    assert err.count("\n") == 1 and err.startswith("dsnas: error: "), err
    assert f"127.0.0.1:{port}" in err and "s3cret-pw" not in err + done.stdout, err
    assert "Fix:" in err, err
    assert elapsed < 15, f"took {elapsed:.1f} s: {err}"


@pytest.mark.slow
def test_two_drivers_on_one_study_run_exactly_the_budget(tiny_study, postgres_url):
    from optuna.trial import TrialState

    study = with_storage(tiny_study, postgres_url, n_trials=6)
    cmd = [sys.executable, "-m", "dsnas.cli", "search", str(study)]
    drivers = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = []
    for driver in drivers:
        try:
            outputs.append(driver.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for d in drivers:
                d.kill()
            pytest.fail("a driver still ran after 300 s")
    log = "\n".join(f"--- driver {i} (exit {d.returncode}):\n{out}" for i, (d, out) in enumerate(zip(drivers, outputs)))
    assert [d.returncode for d in drivers] == [0, 0], log
    trials = stored_trials(postgres_url)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState if any(t.state == s for t in trials)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    trained = [t for t in complete if "reused_from" not in t.user_attrs]  # a repeat of another driver's is reused
    assert len(trained) == 6, f"{len(trained)} trained COMPLETE trials (all: {states})\n{log}"
    keys = [t.user_attrs["evaluation_key"] for t in trained]
    assert len(set(keys)) >= 4, f"drivers trained the same candidates: {keys}"  # in lockstep: 3; a race: 5
    assert len({t.number for t in trials}) == len(trials), f"duplicate trial numbers: {[t.number for t in trials]}"
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], f"left RUNNING: {states}\n{log}"
    assert all("accuracy" in t.user_attrs and t.values for t in complete), "a COMPLETE trial lost its metrics"


def test_set_user_attrs_stores_what_optuna_would_on_postgresql(postgres_url):
    from test_storage import check_set_user_attrs

    check_set_user_attrs(postgres_url)


def test_a_reuse_of_two_trials_measurements_is_stored_on_postgresql(finished_study, postgres_url):
    from test_measure import check_reused_sources_are_stored

    check_reused_sources_are_stored(finished_study, postgres_url)


def test_the_budget_count_of_a_postgresql_study_matches_a_count_of_every_trial(postgres_url):
    from test_storage import check_budget_count

    check_budget_count(postgres_url)


def test_a_resumed_dsnas_sampler_search_learns_from_the_stored_trials_on_postgresql(postgres_url, tmp_path):
    from test_sampler import check_resume

    check_resume(tmp_path, postgres_url)


def test_a_read_is_one_round_trip_on_postgresql(postgres_url):
    """storage.reading runs PostgreSQL reads in autocommit: no BEGIN before the statement and no COMMIT after it,
    so the connection is idle, not in a transaction, once the statement returned (each read of the budget and of
    the measurement cache was three round trips). The pool gives the next user a connection that is not in
    autocommit, which Optuna's writes need."""
    import psycopg
    import sqlalchemy as sa

    from dsnas import storage as dsnas_storage

    engine = sa.create_engine(postgres_url)
    try:
        for _ in range(2):
            with dsnas_storage.reading(engine) as connection:
                assert connection.execute(sa.text("SELECT 1")).scalar() == 1
                dbapi = connection.connection.dbapi_connection
                assert dbapi.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
            assert connection.connection.dbapi_connection.info.transaction_status == \
                psycopg.pq.TransactionStatus.INTRANS
    finally:
        engine.dispose()


def _peaks_of_gibibytes(table: Path) -> None:
    """The table study's peaks made 3-8 GiB at batch 32, as on a GPU."""
    import csv

    with table.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["peak_memory_mb_bs32"] = row["peak_memory_mb"] = str(float(row["peak_memory_mb_bs32"]) * 4000)
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_peak_of_2_gib_or_more_is_stored_and_an_older_32_bit_column_is_widened(tmp_path, postgres_url):
    """peak_memory_bytes was PostgreSQL's 32-bit INTEGER: a trial's 2 GiB peak (ordinary on a GPU at batch 32)
    failed its insert after the trial was told COMPLETE, and every resume failed the same way, for good."""

    import sqlalchemy as sa
    from table_study import write_table_study

    from dsnas import tables

    study = write_table_study(tmp_path, n_trials=3, fidelity='kind = "none"')
    _peaks_of_gibibytes(tmp_path / "table.csv")
    study.write_text(study.read_text().replace("[study]\n", f"[study]\nstorage = {json.dumps(postgres_url)}\n", 1))
    engine = sa.create_engine(postgres_url)
    tables.ensure_schema(engine, "test")  # the tables as an older dsnas made them: a 32-bit column
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE dsnas_measurements ALTER COLUMN peak_memory_bytes TYPE INTEGER"))
    engine.dispose()
    assert main(["search", str(study)]) == 0
    engine = sa.create_engine(postgres_url)
    with engine.connect() as connection:
        peaks = connection.execute(sa.text("SELECT peak_memory_bytes FROM dsnas_measurements")).scalars().all()
    engine.dispose()
    assert len(peaks) == 6 and max(peaks) > 2**31


def test_a_team_member_who_may_not_widen_the_column_still_searches(tmp_path, postgres_url, capsys):
    """A role that may write the rows but not alter the owner's table (ALTER needs the owner) stopped every search
    of an older study with a traceback: "must be owner of table dsnas_measurements"."""

    import optuna
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from table_study import write_table_study

    from dsnas import tables

    study = write_table_study(tmp_path, n_trials=2, fidelity='kind = "none"')
    _peaks_of_gibibytes(tmp_path / "table.csv")
    optuna.storages.RDBStorage(postgres_url).remove_session()  # the owner's tables, Optuna's and dsnas's, as an
    engine = sa.create_engine(postgres_url)  # older dsnas made them: a 32-bit column
    tables.ensure_schema(engine, "test")
    url = make_url(postgres_url)
    member, password = f"dsnas_member_{secrets.token_hex(4)}", secrets.token_hex(8)
    with engine.begin() as connection:
        connection.execute(sa.text("ALTER TABLE dsnas_measurements ALTER COLUMN peak_memory_bytes TYPE INTEGER"))
        connection.execute(sa.text(f"CREATE ROLE {member} LOGIN PASSWORD '{password}'"))
        connection.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {member}"))
        connection.execute(sa.text(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {member}"))
    engine.dispose()
    try:
        as_member = url.set(username=member, password=password).render_as_string(hide_password=False)
        study.write_text(study.read_text().replace("[study]\n", f"[study]\nstorage = {json.dumps(as_member)}\n", 1))
        assert main(["search", str(study)]) == 0
        out = capsys.readouterr().out  # (the search's log)
        assert "peak_memory_bytes is a 32-bit column and this database user may not widen it" in out, out
        assert "Fix: have the table's owner run once: ALTER TABLE dsnas_measurements" in out
        engine = sa.create_engine(postgres_url)
        with engine.connect() as connection:
            peaks = connection.execute(sa.text("SELECT peak_memory_bytes FROM dsnas_measurements")).scalars().all()
        assert len(peaks) == 4 and None in peaks and max(p for p in peaks if p is not None) < 2**31
    finally:
        engine.dispose()
        with _connect(url, url.database) as conn:  # a role outlives the database: drop it by hand
            conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {member}")
            conn.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {member}")
            conn.execute(f"DROP ROLE {member}")
