"""``dask-em`` on a TLS-only Dask cluster (``tls://`` address, ``--tls-*`` options).

The slow tests make a CA and a certificate for 127.0.0.1/localhost with the ``openssl``
command, start a real ``dask scheduler --protocol tls`` and two ``dask worker``
processes with it (each in its own session, killed with their process groups at
teardown), then check that ``dask-em fit --scheduler tls://… --tls-ca-file --tls-cert
--tls-key`` gives the local-cluster fit, and that a plain ``tcp://`` connection, a
``tls://`` address without certificates, certificates of another CA, and a client
certificate the scheduler does not trust each fail with a one-line message (exit 2) naming
the option to fix, and write no model. The fast tests check the options alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import (
    LOCAL,
    assert_ok,
    assert_same_fit,
    assert_usage_error,
    mixture,
    run_cli,
    run_many,
    start_external_cluster,
    write_array,
)

from dask_em import cluster as cluster_module
from dask_em import load_model
from dask_em.cli import OPTION_NAMES
from dask_em.errors import ClusterError

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@dataclass
class Certificates:
    """PEM files: a CA and a certificate (with its key) it signed, for 127.0.0.1."""

    ca: Path
    cert: Path
    key: Path

    def options(self) -> list[str]:
        """The ``dask-em``/``dask`` options naming these files."""
        return [
            "--tls-ca-file",
            str(self.ca),
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(self.key),
        ]


def openssl(*args: object) -> None:
    """Run ``openssl ARGS`` quietly (its output shown if it fails)."""
    result = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def make_certificates(root: Path, name: str) -> Certificates:
    """A new self-signed CA ``name`` and a certificate it signed for IP 127.0.0.1 and DNS
    localhost, usable by servers and clients (scheduler, workers, dask-em)."""
    root.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (
        root / f"{name}-{s}" for s in ("ca.key", "ca.pem", "key.pem", "req.csr", "cert.pem")
    )
    ext = root / f"{name}-ext.cnf"
    ext.write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "basicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth, clientAuth\n"
    )
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={name} test CA", "-keyout", ca_key, "-out", ca)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", key, "-out", csr)  # fmt: skip
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
            "-days", "2", "-extfile", ext, "-out", cert)  # fmt: skip
    return Certificates(ca, cert, key)


@dataclass
class TLSCluster:
    """A running TLS scheduler (``address``, ``scheduler_file``) and its certificates."""

    address: str
    scheduler_file: Path
    certificates: Certificates


@contextmanager
def start_tls_cluster(
    root: Path, certificates: Certificates, n_workers: int = 2
) -> Iterator[TLSCluster]:
    """``dask scheduler --protocol tls`` and ``n_workers`` ``dask worker tls://…``
    processes using ``certificates`` (`cli_helpers.start_external_cluster`), up and
    connected; all killed on exit."""
    from distributed import Security

    security = Security(
        tls_ca_file=str(certificates.ca),
        tls_client_cert=str(certificates.cert),
        tls_client_key=str(certificates.key),
        require_encryption=True,
    )
    with start_external_cluster(
        root,
        n_workers,
        scheduler_options=["--protocol", "tls"],
        options=certificates.options(),
        security=security,
    ) as cluster:
        assert cluster.address.startswith("tls://127.0.0.1:"), cluster.address
        yield TLSCluster(cluster.address, cluster.scheduler_file, certificates)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSCluster]:
    """A TLS scheduler and two workers with freshly made certificates."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    root = tmp_path_factory.mktemp("tls-cluster")
    with start_tls_cluster(root, make_certificates(root / "certs", "cluster")) as cluster:
        yield cluster


@pytest.mark.slow
def test_fit_on_a_tls_cluster_equals_the_local_fit(tls_cluster: TLSCluster, tmp_path: Path) -> None:
    """``--scheduler tls://… --tls-ca-file --tls-cert --tls-key`` (and ``--scheduler-file``
    with the same options) fits on the TLS workers and gives the local-cluster parameters
    and history; ``score`` works over TLS too."""
    data = write_array(tmp_path / "data.zarr", mixture(6000, 3, 2, seed=21), (500, 3))
    common = ["fit", data, "--n-components", "2", "--tol", "1e-6", "--max-iter", "40", "--quiet"]
    local = run_cli(*common, "--output", tmp_path / "local.zarr", *LOCAL)
    assert_ok(local)
    tls = tls_cluster.certificates.options()
    for option, value, name in (
        ("--scheduler", tls_cluster.address, "tls.zarr"),
        ("--scheduler-file", tls_cluster.scheduler_file, "tls-file.zarr"),
    ):
        result = run_cli(*common, "--output", tmp_path / name, option, value, *tls)
        assert_ok(result)
        assert_same_fit(load_model(tmp_path / name), load_model(tmp_path / "local.zarr"))
    score = run_cli("score", tmp_path / "tls.zarr", data, "--scheduler", tls_cluster.address, *tls)
    assert_ok(score)
    assert json.loads(score.stdout)["n_samples"] == 6000


@pytest.mark.slow
def test_plain_or_wrong_certificate_connections_to_a_tls_cluster_fail_in_one_line(
    tls_cluster: TLSCluster, tmp_path: Path
) -> None:
    """A ``tcp://`` address of the TLS scheduler, its ``tls://`` address (or scheduler file)
    without certificates, certificates of another CA, and a client certificate the
    scheduler does not trust (with its CA trusted) each exit 2 with one line naming TLS
    and the option to fix, quickly, and write no model."""
    data = write_array(tmp_path / "data.zarr", mixture(600, 2, 2, seed=3), (300, 2))
    port = tls_cluster.address.rsplit(":", 1)[1]
    others = make_certificates(tmp_path / "certs", "other")
    other = others.options()
    # trusts the scheduler's CA, but presents a client certificate the scheduler does not
    untrusted_client = ["--tls-ca-file", tls_cluster.certificates.ca,
                        "--tls-cert", others.cert, "--tls-key", others.key]  # fmt: skip
    cases = {
        "tcp": (["--scheduler", f"tcp://127.0.0.1:{port}"], ("tcp://127.0.0.1", "TLS", "--tls-ca-file")),
        "no-scheme": (["--scheduler", f"127.0.0.1:{port}"], ("TLS", "--tls-cert")),
        "tls-no-certs": (["--scheduler", tls_cluster.address], ("uses TLS", "--tls-ca-file", "--tls-key")),
        "file-no-certs": (["--scheduler-file", tls_cluster.scheduler_file], ("uses TLS", "--tls-cert")),
        "other-ca": (["--scheduler", tls_cluster.address, *other], ("TLS handshake failed", "--tls-ca-file")),
        # the scheduler's alert (TLSV1_ALERT_UNKNOWN_CA) or, if it closes first, an EOF
        "client-cert": (["--scheduler", tls_cluster.address, *untrusted_client], ("TLS handshake failed", "rejected the client certificate", "--tls-cert")),
    }  # fmt: skip
    results = run_many(
        {
            key: ["fit", data, "--n-components", "2", "--output", tmp_path / f"{key}.zarr", *args]
            for key, (args, _) in cases.items()
        }
    )
    for key, (_, fragments) in cases.items():
        assert_usage_error(results[key], *fragments)
        assert not (tmp_path / f"{key}.zarr").exists(), key


def test_tls_options_are_checked_before_connecting(tmp_path: Path) -> None:
    """TLS options without a scheduler, a missing certificate file, a ``tls://`` address
    without certificates, certificates for a ``tcp://`` address and a certificate without
    a CA file are each one-line errors (exit 2), with no cluster involved."""
    pem = tmp_path / "x.pem"
    pem.write_text("not used\n")
    tls = ["--tls-ca-file", pem, "--tls-cert", pem, "--tls-key", pem]
    data = write_array(tmp_path / "data.zarr", mixture(100, 2, 2, seed=0))
    fit = ["fit", data, "--n-components", "2", "--output", tmp_path / "m.zarr"]
    cases = {
        "no-scheduler": ([*fit, *tls], ("--scheduler=tls://HOST:PORT",)),
        "no-scheduler-demo": (["demo", "--workdir", tmp_path / "demo", *tls], ("--scheduler",)),
        "missing-file": (
            [*fit, "--scheduler", "tls://127.0.0.1:1", "--tls-ca-file", tmp_path / "nope.pem",
             "--tls-cert", pem],
            ("--tls-ca-file", "nope.pem", "no such file"),
        ),
        "tls-no-certs": ([*fit, "--scheduler", "tls://127.0.0.1:1"], ("uses TLS", "--tls-ca-file")),
        "tcp-with-certs": ([*fit, "--scheduler", "tcp://127.0.0.1:1", *tls], ("tls://", "tcp://")),
        "cert-without-ca": ([*fit, "--scheduler", "tls://127.0.0.1:1", "--tls-cert", pem], ("--tls-ca-file",)),
    }  # fmt: skip
    results = run_many({key: args for key, (args, _) in cases.items()})
    for key, (_, fragments) in cases.items():
        assert_usage_error(results[key], *fragments)
    assert not (tmp_path / "m.zarr").exists()


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("in <TLS (closed)>: SSLError: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca",
         ("(TLSV1_ALERT_UNKNOWN_CA)", "rejected the client certificate", "--tls-cert")),
        ("in <TLS (closed)>: SSLEOFError: EOF occurred in violation of protocol (_ssl.c:2427)",
         ("the scheduler closed the connection", "rejected the client certificate", "--tls-cert")),
        ("in <TLS (closed)>: SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
         ("(CERTIFICATE_VERIFY_FAILED)", "--tls-ca-file must be the CA")),
    ],
    ids=["alert", "closed", "server-cert"],
)  # fmt: skip
def test_handshake_failures_name_the_certificate_to_fix(
    text: str, fragments: tuple[str, ...]
) -> None:
    """The texts distributed gives for a failed TLS handshake (whether the scheduler's
    alert or its closing the connection reaches the client first is a race, so the
    cluster test above may see either) each map to a message naming the option to fix
    (the library's message template, rendered with the CLI's option names)."""
    from distributed.comm.core import FatalCommClosedError

    with_certificates = object()  # only whether TLS options were given matters here
    template = cluster_module._connect_failure(
        FatalCommClosedError(text), "tls://h:1", with_certificates
    )
    message = ClusterError(template).render(OPTION_NAMES)
    assert message.startswith(
        "cannot connect to the Dask scheduler at tls://h:1: the TLS handshake failed"
    )
    for fragment in fragments:
        assert fragment in message, message
