"""Real containers for the tests: podman, a Debian base image made here, podman-compose.

No image registry is reachable from the test machines, so the base image of
``docker/Dockerfile`` is made on the machine: `base_image` runs ``debootstrap
--variant=minbase --include=python3,python3-venv,python3-pip bookworm`` into a directory
and imports the tree with ``podman import`` as ``localhost/dask-em-base:bookworm``
(about 3.5 minutes, then cached: podman keeps the image between runs and it is reused
while it exists).

`Podman` runs ``podman`` and ``podman-compose`` with ``CONTAINERS_CONF`` pointing at a
configuration written by `Podman.create`: the OCI runtime ``runc`` (Debian's podman
package installs no crun), and container ulimits below this machine's (without them runc
fails: "error setting rlimit type 7: operation not permitted"). Containers use podman's default storage and the
bridge network podman-compose creates per project, where the ``dnsname`` CNI plugin
resolves service names (``tcp://scheduler:8786``).

`containers_missing` says why containers cannot run here (None if they can): podman,
runc, debootstrap and dnsname are Debian packages (`CONTAINER_PACKAGES`, installed by
``.ci/run``; `install_container_packages` installs them as root where apt-get exists).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("podman", "runc", "debootstrap", "golang-github-containernetworking-plugin-dnsname")
CONTAINER_PACKAGES = f"apt-get install -y --no-install-recommends {' '.join(PACKAGES)}"
BASE_IMAGE = "localhost/dask-em-base:bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DNSNAME = Path("/usr/lib/cni/dnsname")

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
"""


def _missing_tools() -> list[str]:
    """The container tools (of `PACKAGES`) this machine lacks."""
    missing = [name for name in ("podman", "runc", "debootstrap") if not _which(name)]
    if not DNSNAME.exists():
        missing.append(str(DNSNAME))
    return missing


def _which(name: str) -> str | None:
    """The path of a command (``/usr/sbin`` is not on every root PATH: debootstrap is there)."""
    found = shutil.which(name) or f"/usr/sbin/{name}"
    return found if Path(found).exists() else None


def install_container_packages() -> None:
    """Install `PACKAGES` with apt-get (root only), updating the package lists first."""
    environ = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], CONTAINER_PACKAGES.split() + ["-q"]):
        subprocess.run(argv, check=True, capture_output=True, env=environ, timeout=900)


def containers_missing() -> str | None:
    """Why containers cannot run here (None if they can), after installing the missing
    packages where that is possible (root with apt-get)."""
    missing = _missing_tools()
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        install_container_packages()
        missing = _missing_tools()
    if missing:
        return f"container tools missing ({', '.join(missing)}): {CONTAINER_PACKAGES} (as root)"
    if os.geteuid() != 0:
        return "the container tests run rootful podman (debootstrap, CNI networks): run as root"
    if compose_command() is None:
        return "podman-compose is not installed: pip install podman-compose (the test extra)"
    return None


def compose_command() -> list[str] | None:
    """The argv prefix of ``podman-compose`` (next to this interpreter, else on the PATH)."""
    script = Path(sys.executable).with_name("podman-compose")
    if script.exists():
        return [str(script)]
    found = shutil.which("podman-compose")
    return [found] if found else None


def ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts (``PIP_CERT``, ``SSL_CERT_FILE``, OpenSSL's
    default): passed to the image build as the secret ``pip_cert``, so that pip inside
    the build trusts what the machine trusts (a TLS-intercepting proxy's CA included)."""
    candidates = [
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
    ]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


@dataclass
class Podman:
    """``podman`` and ``podman-compose`` with a test configuration.

    Attributes
    ----------
    conf : Path
        The ``containers.conf`` that ``CONTAINERS_CONF`` names.
    """

    conf: Path

    @classmethod
    def create(cls, root: Path) -> Podman:
        """Write the configuration under ``root``."""
        conf = root / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        return cls(conf)

    @property
    def environ(self) -> dict[str, str]:
        """This process's environment with ``CONTAINERS_CONF`` set."""
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120,
        environ: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman ARGS`` with ``environ`` added to the environment; fail on a non-zero
        status if ``check``."""
        return self._run(["podman", *args], check, timeout, environ)

    def compose(
        self, *args: str, check: bool = True, timeout: float = 300, environ: dict[str, str]
    ) -> subprocess.CompletedProcess[str]:
        """Run ``podman-compose ARGS`` with ``environ`` added to the environment."""
        command = compose_command()
        assert command is not None
        return self._run([*command, *args], check, timeout, environ)

    def _run(
        self, argv: list[str], check: bool, timeout: float, environ: dict[str, str] | None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env={**self.environ, **(environ or {})},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def image_exists(self, name: str) -> bool:
        """Whether podman's store holds the image ``name``."""
        return self.run("image", "exists", name, check=False).returncode == 0

    def base_image(self, workdir: Path) -> str:
        """`BASE_IMAGE`, made from a debootstrap'ed Debian bookworm unless podman has it
        already; the root file system (about 300 MB) is removed once imported."""
        if not self.image_exists(BASE_IMAGE):
            rootfs = workdir / "rootfs"
            subprocess.run(
                [
                    _which("debootstrap") or "debootstrap",
                    "--variant=minbase",
                    "--include=python3,python3-venv,python3-pip",
                    "bookworm",
                    str(rootfs),
                    DEBIAN_MIRROR,
                ],
                check=True,
                capture_output=True,
                timeout=1800,
                stdin=subprocess.DEVNULL,
            )
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            try:
                subprocess.run(
                    ["podman", "import", "-", BASE_IMAGE],
                    stdin=tar.stdout,
                    check=True,
                    capture_output=True,
                    timeout=600,
                    env=self.environ,
                )
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait(timeout=60)
            shutil.rmtree(rootfs)
        return BASE_IMAGE

    def project_labels(self, kind: str, project: str) -> list[str]:
        """The names of the containers, volumes or networks (``kind``) podman-compose made
        for ``project`` that still exist."""
        label = f"io.podman.compose.project={project}"
        if kind == "container":
            out = self.run("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}")
        else:
            out = self.run(kind, "ls", "--filter", f"label={label}", "--format", "{{.Name}}")
        return out.stdout.split()
