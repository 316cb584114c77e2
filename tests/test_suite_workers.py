"""The suite's ``-n auto`` worker count (tests/conftest.py): one per usable CPU, a container's quota included."""
from __future__ import annotations

import builtins
import io
import os

import pytest

import conftest


def fake_files(monkeypatch, files: dict[str, str]) -> None:
    """``open`` of a path in ``files`` reads its text; any other cgroup path does not exist."""
    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path) in files:
            return io.StringIO(files[str(path)])
        if str(path).startswith("/sys/fs/cgroup"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


@pytest.mark.parametrize("files, quota", [
    ({"/sys/fs/cgroup/cpu.max": "max 100000\n"}, None),
    ({"/sys/fs/cgroup/cpu.max": "150000 100000\n"}, 1.5),
    ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"/sys/fs/cgroup/cpu/cpu.cfs_quota_us": "300000\n", "/sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
    ({}, None),
])
def test_the_cgroup_quota_is_read_from_v2_or_v1(monkeypatch, files, quota):
    fake_files(monkeypatch, files)
    assert conftest.cgroup_cpu_quota() == quota


@pytest.mark.parametrize("affinity, quota, expected", [(4, None, 4), (4, 1.5, 1), (2, 8.0, 2), (4, 0.5, 1)])
def test_workers_are_the_affinity_capped_by_the_quota(monkeypatch, affinity, quota, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(conftest, "cgroup_cpu_quota", lambda: quota)
    assert conftest.usable_cpus() == expected


def test_an_explicit_worker_count_wins(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "5")
    assert conftest.pytest_xdist_auto_num_workers(None) is None
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS")
    assert conftest.pytest_xdist_auto_num_workers(None) == conftest.usable_cpus()
