"""Object stores end to end: every command on ``s3://`` URLs against a real S3 API server.

The server is moto's S3 (and IAM) server on 127.0.0.1 at a free port, started by the
`s3_server` fixture in a thread of the test process and stopped at teardown; it
enforces credentials (an IAM user made while it still accepts anonymous requests),
and supports conditional writes (``If-None-Match: *``), which the checkpoint lock needs.
The commands run as real ``dask-em`` processes with the credentials and the endpoint in
their environment (``AWS_ENDPOINT_URL``), or given by ``--storage-option``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_same_fit,
    assert_usage_error,
    current_iteration,
    kill_group,
    mixture,
    run_cli,
    start_cli,
    wait_for,
    write_array,
)
from warehouse_helpers import DATES, duckdb_rows, write_date

from dask_em import GaussianMixture, load_model
from dask_em.checkpoint import Checkpoint, CheckpointDamaged, CheckpointLocked
from dask_em.errors import OutputError
from dask_em.ingest import LOCK, ingest
from dask_em.io import open_array
from dask_em.store import Location, object_lock

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

REGION = "us-east-1"


@dataclass
class S3:
    """A running S3 server: its endpoint and credentials that it accepts."""

    endpoint: str
    key: str
    secret: str

    def options(self, **changes: Any) -> dict[str, Any]:
        """fsspec storage options for this server (``changes`` override)."""
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint, **changes}

    def fs(self) -> Any:
        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3]:
    """moto's S3 server on loopback, enforcing credentials after the first 3 requests
    (which create an IAM user with S3 rights and its access key)."""
    import boto3
    from moto import settings

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 3
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="dask-em")
        iam.put_user_policy(
            UserName="dask-em",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="dask-em")["AccessKey"]
        yield S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before
        server.stop()


@pytest.fixture
def s3(s3_server: S3, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[S3, str]]:
    """The server's credentials and endpoint in the environment (inherited by the
    ``dask-em`` processes), and a new empty bucket: ``(server, bucket)``."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    s3_server.fs().mkdir(bucket)
    yield s3_server, bucket


def keys(server: S3, bucket: str) -> list[str]:
    """Every object in ``bucket``."""
    return sorted(server.fs().find(bucket))


def upload_array(server: S3, url: str, X: np.ndarray, rows: int) -> None:
    """Write ``X`` to a Zarr array at ``url`` (rows chunked by ``rows``)."""
    z = zarr.create_array(
        url, shape=X.shape, chunks=(rows, X.shape[1]), dtype=X.dtype,
        storage_options=server.options(),
    )  # fmt: skip
    z[...] = X


# ----------------------------------------------------------------------------- ingest
@pytest.mark.slow
def test_ingest_from_s3_parquet_then_fit_predict_score_info_on_s3(
    s3: tuple[S3, str], tmp_path: Path, given_inits: Any
) -> None:
    """A hive-partitioned dataset in a bucket is ingested (the same rows as DuckDB reads
    locally); the store goes to the bucket; fit, predict, score and info read and write
    s3:// and equal the same commands on local paths."""
    server, bucket = s3
    warehouse = tmp_path / "warehouse"
    for day in range(3):
        write_date(warehouse, day)
    server.fs().put(str(warehouse), f"{bucket}/warehouse", recursive=True)
    store = tmp_path / "data.zarr"
    result = run_cli(
        "ingest", f"s3://{bucket}/warehouse", store, "--missing", "drop", "--json", "--quiet"
    )
    assert_ok(result)
    assert [p["name"] for p in json.loads(result.stdout)["partitions"]] == [
        "dt=2026-11-20",
        "dt=2026-11-21",
        "dt=2026-11-22",
    ]
    X = duckdb_rows(warehouse)
    assert np.array_equal(open_array(store).compute(), X)
    query = ["--query", "SELECT f1, i2 FROM source WHERE dt <> '2026-11-21'", "--missing", "drop"]
    from_s3, local = tmp_path / "q-s3.zarr", tmp_path / "q-local.zarr"
    assert_ok(run_cli("ingest", f"s3://{bucket}/warehouse", from_s3, *query, "--quiet"))
    assert_ok(run_cli("ingest", warehouse, local, *query, "--quiet"))
    assert np.array_equal(zarr.open_array(str(from_s3))[...], zarr.open_array(str(local))[...])

    data = f"s3://{bucket}/data.zarr"
    upload_array(server, data, X, 256)
    fit = ["--n-components", "3", "--tol", "0", "--max-iter", "8", "--seed", "2", *LOCAL]
    assert_ok(run_cli("fit", data, *fit, "--output", f"s3://{bucket}/model.zarr", "--quiet"))
    local = write_array(tmp_path / "local.zarr", X, (256, X.shape[1]))
    assert_ok(run_cli("fit", local, *fit, "--output", tmp_path / "model.zarr", "--quiet"))
    remote = load_model(f"s3://{bucket}/model.zarr", server.options())
    assert_same_fit(remote, load_model(tmp_path / "model.zarr"), atol=1e-12)

    info = run_cli("info", f"s3://{bucket}/model.zarr")
    assert_ok(info)
    assert json.loads(info.stdout)["n_iter"] == remote.n_iter_

    labels = f"s3://{bucket}/labels.zarr"
    assert_ok(run_cli("predict", f"s3://{bucket}/model.zarr", data, "--output", labels,
                      "--quiet", *LOCAL))  # fmt: skip
    read_back = zarr.open_array(labels, mode="r", storage_options=server.options())[...]
    assert np.array_equal(read_back, remote.predict(X))
    assert (
        zarr.open_array(labels, storage_options=server.options()).attrs["dask_em_output"]
        == "predictions"
    )
    score = run_cli("score", f"s3://{bucket}/model.zarr", data, *LOCAL)
    assert_ok(score)
    assert json.loads(score.stdout)["mean_log_likelihood"] == pytest.approx(
        remote.score(X), rel=1e-12
    )


def s3_store(server: S3, url: str) -> tuple[np.ndarray, dict]:
    """What a reader of the Zarr array at ``url`` sees: its rows and attributes."""
    array = zarr.open_array(url, mode="r", storage_options=server.options())
    return array[...], array.attrs.asdict()


def test_ingest_into_a_bucket_appends_like_a_local_store_and_refuses_a_replacement(
    s3: tuple[S3, str], warehouse: Path, tmp_path: Path
) -> None:
    """``ingest`` writes its store to s3:// and appends to it there: the same rows and
    record as a local ingest of the same partitions, no staging or lock object left; a
    re-ingest is a no-op; replacing a changed partition (which needs renames) is
    refused in one line with the store unchanged."""
    server, bucket = s3
    url, options = f"s3://{bucket}/data.zarr", server.options()
    first = ingest(warehouse, url, missing="drop", chunk_rows=128, storage_options=options)
    assert first["out"] == url and first["rows_added"] == len(duckdb_rows(warehouse))
    write_date(warehouse, 3)
    appended = ingest(warehouse, url, missing="drop", storage_options=options)
    assert [p["status"] for p in appended["partitions"]] == ["unchanged"] * 3 + ["added"]
    local = tmp_path / "local.zarr"
    ingest(warehouse, local, missing="drop", chunk_rows=128)
    rows, attrs = s3_store(server, url)
    assert np.array_equal(rows, zarr.open_array(str(local))[...])
    assert attrs == zarr.open_array(str(local)).attrs.asdict()
    assert np.array_equal(open_array(url, storage_options=options).compute(), rows)
    assert not [k for k in keys(server, bucket) if "/.ingest-" in k or k.endswith("ingest.lock")]

    again = ingest(warehouse, url, missing="drop", storage_options=options)
    assert again["rows_added"] == 0
    before = keys(server, bucket)
    write_date(warehouse, 1, seed=99)
    with pytest.raises(OutputError, match="renames that object stores lack") as err:
        ingest(warehouse, url, missing="drop", replace_partition=True, storage_options=options)
    assert "\n" not in str(err.value)
    assert keys(server, bucket) == before and s3_store(server, url)[0].shape == rows.shape


def test_an_ingest_into_a_bucket_is_refused_while_another_holds_its_lock(
    s3: tuple[S3, str], warehouse: Path
) -> None:
    """The store's lock object (a conditional PUT) admits one ingest: held by a live
    process, a second ingest is refused in one line naming it and writes nothing."""
    server, bucket = s3
    url, options = f"s3://{bucket}/data.zarr", server.options()
    lock = Location(url, options).child(LOCK)
    with object_lock(lock, unsupported=AssertionError, held=AssertionError):
        with pytest.raises(OutputError, match=f"another ingest is writing .*pid {os.getpid()}"):
            ingest(warehouse, url, missing="drop", storage_options=options)
        assert keys(server, bucket) == [f"{bucket}/data.zarr/{LOCK}"]
    assert keys(server, bucket) == []


KILLER_S3 = textwrap.dedent(
    """
    import os, signal, sys
    from dask_em.ingest import ingest
    from dask_em.store import Location

    source, out, partition, kill_at = sys.argv[1:5]
    calls, real = [0], Location.move_to

    def move_to(self, dest):  # each chunk, then the metadata, into the store
        calls[0] += 1
        if calls[0] == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, dest)

    Location.move_to = move_to
    ingest(source, out, partition=partition, missing="drop")
    """
)
"""Runs `ingest` and SIGKILLs itself before its KILL_AT-th move of an object into the store."""


@pytest.mark.slow
def test_append_to_a_bucket_killed_before_each_move_leaves_the_store_and_rerun_completes_it(
    s3: tuple[S3, str], warehouse: Path, tmp_path: Path
) -> None:
    """SIGKILL an append to an s3:// store before each of its moves into the store (the
    chunks from the partial last one on, then the metadata): readers see the store as
    before; the next run takes over the dead process's lock, clears its staging objects
    and completes the append, equal to a fresh ingest of the four dates."""
    server, bucket = s3
    url, options = f"s3://{bucket}/data.zarr", server.options()
    ingest(warehouse, url, missing="drop", chunk_rows=128, storage_options=options)
    before = s3_store(server, url)
    write_date(warehouse, 3)
    moves = -(-len(duckdb_rows(warehouse)) // 128) - len(before[0]) // 128 + 1
    command = [sys.executable, "-c", KILLER_S3, str(warehouse), url, f"dt={DATES[3]}"]
    for kill_at in range(1, moves + 1):
        killed = subprocess.run([*command, str(kill_at)], capture_output=True, timeout=120)
        assert killed.returncode == -9, killed.stderr.decode()[-2000:]
        rows, attrs = s3_store(server, url)
        assert np.array_equal(rows, before[0]) and attrs == before[1], kill_at
    rerun = subprocess.run([*command, "0"], capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    fresh = tmp_path / "fresh.zarr"
    ingest(warehouse, fresh, missing="drop", chunk_rows=128)
    rows, attrs = s3_store(server, url)
    assert np.array_equal(rows, zarr.open_array(str(fresh))[...])
    assert attrs == zarr.open_array(str(fresh)).attrs.asdict()
    assert not [k for k in keys(server, bucket) if "/.ingest-" in k or k.endswith("ingest.lock")]


# ------------------------------------------------------------------ checkpoint on s3
@pytest.mark.slow
def test_fit_checkpointed_on_s3_killed_and_resumed_equals_an_uninterrupted_local_fit(
    s3: tuple[S3, str], tmp_path: Path
) -> None:
    """SIGKILL a ``dask-em fit`` whose data, checkpoint and model are in a bucket after
    >= 3 committed iterations; the same command resumes (taking over the dead fit's lock
    object) and ends equal to an uninterrupted local fit (<= 1e-12)."""
    server, bucket = s3
    X = mixture(60_000, 6, 4, seed=3)
    data = f"s3://{bucket}/data.zarr"
    upload_array(server, data, X, 7_500)
    common = ["--n-components", "4", "--tol", "0", "--max-iter", "25", *LOCAL]
    local = write_array(tmp_path / "data.zarr", X, (7_500, 6))
    assert_ok(run_cli("fit", local, *common, "--output", tmp_path / "ref.zarr", "--quiet"))

    ckpt, model = f"s3://{bucket}/ckpt", f"s3://{bucket}/model.zarr"
    command = ["fit", data, *common, "--output", model, "--checkpoint-dir", ckpt]

    def committed() -> int:
        try:
            loaded = Checkpoint(ckpt, {}, server.options()).load(check_fingerprint=False)
        except (FileNotFoundError, CheckpointDamaged):
            return -1
        return current_iteration(loaded)

    process = start_cli(*command)
    try:
        wait_for(
            lambda: process.poll() is not None or committed() >= 3,
            timeout=180,
            what="a committed state with 3 iterations on s3",
            interval=0.2,
        )
        assert process.poll() is None, f"the fit ended before the kill\n{process.stderr.read()}"
    finally:
        kill_group(process)
    done = committed()
    assert 3 <= done < 25
    assert f"{bucket}/ckpt/lock" in keys(server, bucket)  # left by the killed fit
    assert f"{bucket}/model.zarr/zarr.json" not in keys(server, bucket)

    resumed = run_cli(*command)
    assert_ok(resumed)
    assert "Resuming" in resumed.stderr
    assert f"{bucket}/ckpt/lock" not in keys(server, bucket)
    assert_same_fit(
        load_model(model, server.options()), load_model(tmp_path / "ref.zarr"), atol=1e-12
    )


def test_object_store_checkpoint_lock_admits_one_fit_and_saves_commit_by_manifest(
    s3: tuple[S3, str],
) -> None:
    """The lock object is created with a conditional PUT: a second holder is refused in
    one line naming the first; a Python fit checkpointed on s3 resumes to the same result."""
    server, bucket = s3
    url = f"s3://{bucket}/ckpt"
    first = Checkpoint(url, {}, server.options())
    with first.lock():
        with pytest.raises(CheckpointLocked, match="in use by another fit"):
            with Checkpoint(url, {}, server.options()).lock():
                pass
    assert keys(server, bucket) == []

    X = mixture(3_000, 3, 2, seed=5)
    options = dict(n_components=2, tol=0.0, max_iter=6, random_state=0)
    a = GaussianMixture(**options, checkpoint_dir=url, storage_options=server.options()).fit(X)
    names = {k.rsplit("/", 2)[-2] for k in keys(server, bucket) if "/state-" in k}
    assert len(names) == 3  # KEEP_STATES committed states, listed by the manifest
    b = GaussianMixture(**options, checkpoint_dir=url, storage_options=server.options()).fit(X)
    assert_same_fit(a, b)
    assert_same_fit(a, GaussianMixture(**options).fit(X))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_checkpoint_lock_false_fits_beside_a_held_lock_and_leaves_it(s3: tuple[S3, str]) -> None:
    """``checkpoint_lock=False`` (``--no-lock``, for stores without conditional writes)
    takes no lock: a fit runs on a checkpoint whose lock another process holds (refused
    with the lock), leaves that lock object as it was, and equals an unchecked fit."""
    server, bucket = s3
    url = f"s3://{bucket}/ckpt"
    X = mixture(2_000, 3, 2, seed=6)
    options = dict(n_components=2, tol=0.0, max_iter=4, random_state=0)
    with Checkpoint(url, {}, server.options()).lock():
        held = server.fs().cat_file(f"{bucket}/ckpt/lock")
        with pytest.raises(CheckpointLocked, match="in use by another fit"):
            GaussianMixture(**options, checkpoint_dir=url, storage_options=server.options()).fit(X)
        unlocked = GaussianMixture(
            **options, checkpoint_dir=url, storage_options=server.options(), checkpoint_lock=False
        ).fit(X)
        assert server.fs().cat_file(f"{bucket}/ckpt/lock") == held
    assert_same_fit(unlocked, GaussianMixture(**options).fit(X))


# ------------------------------------------------------------------------ bad input
@pytest.mark.slow
def test_bad_credentials_missing_bucket_and_unreachable_endpoint_exit_2_writing_nothing(
    s3: tuple[S3, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, bucket = s3
    data = f"s3://{bucket}/data.zarr"
    upload_array(server, data, mixture(500, 3, 2, seed=1), 100)
    before = keys(server, bucket)
    fit = ["--n-components", "2", "--max-iter", "2", "--quiet", *LOCAL]
    out = f"s3://{bucket}/model.zarr"

    wrong = run_cli(
        "fit", data, *fit, "--output", out,
        "--storage-option", f"key={server.key}", "--storage-option", "secret=wrong",
    )  # fmt: skip
    assert_usage_error(wrong, "denied", "--storage-option key=/secret=")
    missing = run_cli("fit", data, *fit, "--output", "s3://no-such-bucket/m.zarr")
    assert_usage_error(missing, "bucket 'no-such-bucket'", "does not exist")
    missing = run_cli("fit", data, *fit, "--output", tmp_path / "m.zarr",
                      "--checkpoint-dir", "s3://no-such-bucket/ckpt")  # fmt: skip
    assert_usage_error(missing, "bucket 'no-such-bucket'")
    unreachable = run_cli(
        "predict", out, data, "--output", f"s3://{bucket}/l.zarr",
        "--storage-option", f"endpoint_url=http://127.0.0.1:{_free_port()}",
    )  # fmt: skip
    assert_usage_error(unreachable, "cannot reach the object store", "endpoint_url=")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert_usage_error(run_cli("info", data), "denied")
    assert_usage_error(run_cli("ingest", f"s3://{bucket}/x", tmp_path / "x.zarr"), "denied")
    assert keys(server, bucket) == before
    assert not (tmp_path / "m.zarr").exists() and not (tmp_path / "x.zarr").exists()


def test_a_model_version_without_its_pointer_is_invisible_and_removed_by_the_next_save(
    s3: tuple[S3, str],
) -> None:
    """A writer killed after writing a version but before the pointer object leaves the
    previous model readable; the next save publishes over it and removes the orphan."""
    from dask_em.io import _write_version
    from dask_em.store import Location

    server, bucket = s3
    url = f"s3://{bucket}/model.zarr"
    X = mixture(2_000, 3, 2, seed=4)
    first = GaussianMixture(2, random_state=0, max_iter=3, tol=0.0).fit(X)
    first.set_params(storage_options=server.options()).save(url)
    orphan = "v-00000007-" + "0" * 32
    second = GaussianMixture(2, random_state=1, max_iter=5, tol=0.0).fit(X)
    _write_version(Location(url, server.options()).child(orphan), second._params(), {})
    assert_same_fit(load_model(url, server.options()), first)
    second.set_params(storage_options=server.options()).save(url)
    assert_same_fit(load_model(url, server.options()), second)
    versions = {k.split("/")[2] for k in keys(server, bucket) if "/v-" in k}
    assert orphan not in versions and len(versions) == 2  # current and previous


def test_storage_options_from_the_command_line_nest_and_parse_json_values() -> None:
    from dask_em.cli import build_parser, storage_options

    args = build_parser().parse_args(
        ["info", "s3://b/m.zarr", "--storage-option", "anon=false",
         "--storage-option", "client_kwargs.region_name=eu-west-1",
         "--storage-option", "endpoint_url=http://h:9000"]
    )  # fmt: skip
    assert storage_options(args.storage_option) == {
        "anon": False,
        "client_kwargs": {"region_name": "eu-west-1"},
        "endpoint_url": "http://h:9000",
    }
