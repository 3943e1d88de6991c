"""The embedded local cluster's worker processes: malloc settings sized to their memory.

Workers keep freed memory for the next pass (`dask_em.cluster.WORKER_MALLOC_ENVIRON`),
but never more than 1/8 of their memory limit: memory malloc keeps counts against Dask's
80% pause threshold and pausing does not release it, so a small worker that kept 256 MiB
paused for good.
"""

from __future__ import annotations

import os

import pytest
from distributed import Client, LocalCluster

from dask_em.cluster import WORKER_MALLOC_ENVIRON, local_cluster, worker_malloc_environ

MiB = 2**20


@pytest.mark.parametrize(
    ("limit", "trim", "mmap"),
    [
        (None, 256 * MiB, 128 * MiB),
        (0, 256 * MiB, 128 * MiB),  # Dask's "no limit"
        (4096 * MiB, 256 * MiB, 128 * MiB),
        (1536 * MiB, 192 * MiB, 128 * MiB),
        (512 * MiB, 64 * MiB, 64 * MiB),
    ],
)
def test_malloc_retention_is_at_most_an_eighth_of_the_memory_limit(limit, trim, mmap):
    assert worker_malloc_environ(limit) == {
        "MALLOC_TRIM_THRESHOLD_": trim,
        "MALLOC_MMAP_THRESHOLD_": mmap,
    }
    assert set(WORKER_MALLOC_ENVIRON) == set(worker_malloc_environ(limit))


def _malloc_environ() -> dict[str, str]:
    return {name: os.environ.get(name, "") for name in WORKER_MALLOC_ENVIRON}


def test_local_cluster_workers_get_the_settings_of_their_memory_limit():
    # A Nanny writes its settings into this process's environment and prefers them to
    # its configuration: a plain LocalCluster (Dask's 64 KiB trim threshold) and a
    # cluster of another limit started before must not decide the next one's.
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as plain:
        with Client(plain) as client:
            (seen,) = client.run(_malloc_environ).values()
        assert seen["MALLOC_TRIM_THRESHOLD_"] == "65536"
    before = _malloc_environ()  # the plain cluster's Nanny wrote its settings here
    for limit, expected in (("512MiB", 64 * MiB), ("4GiB", None), ("512MiB", 64 * MiB)):
        with local_cluster(1, 1, limit) as cluster, Client(cluster) as client:
            (seen,) = client.run(_malloc_environ).values()
        assert seen == {
            name: str(expected or value) for name, value in WORKER_MALLOC_ENVIRON.items()
        }
        assert _malloc_environ() == before  # and this process's environment is restored
