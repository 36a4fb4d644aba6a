"""The CLI's default CPU thread count: OMP_NUM_THREADS, else the usable cores other work leaves idle."""

from __future__ import annotations

import pytest

from blip3o_engine import threads


def stat_sampler(*samples):
    """A fake read_cpu_times returning the given samples in turn."""
    it = iter(samples)
    return lambda: next(it)


@pytest.fixture
def four_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "allowed_cpus", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)


def no_sleep(_seconds):
    pass


def test_idle_machine_uses_every_allowed_core(four_cpus):
    before = {c: (100, 1000) for c in range(4)}
    after = {c: (100, 1100) for c in range(4)}  # 100 jiffies each, all idle
    assert threads.default_num_threads(stat_sampler(before, after), no_sleep) == 4


def test_busy_cores_are_left_out(four_cpus):
    before = {c: (0, 0) for c in range(4)}
    # cpu0 fully busy, cpu1 70% (taken), cpu2 40% (free), cpu3 idle: 2.1 busy cores -> 2 taken.
    after = {0: (100, 100), 1: (70, 100), 2: (40, 100), 3: (0, 100)}
    assert threads.busy_cores(before, after, {0, 1, 2, 3}) == pytest.approx(2.1)
    assert threads.default_num_threads(stat_sampler(before, after), no_sleep) == 2


def test_never_below_one_thread(four_cpus):
    before = {c: (0, 0) for c in range(4)}
    after = {c: (100, 100) for c in range(4)}
    assert threads.default_num_threads(stat_sampler(before, after), no_sleep) == 1


def test_only_allowed_cpus_count(monkeypatch, four_cpus):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: {2, 3})
    before = {c: (0, 0) for c in range(4)}
    after = {0: (100, 100), 1: (100, 100), 2: (0, 100), 3: (0, 100)}  # busy cores outside the mask
    assert threads.default_num_threads(stat_sampler(before, after), no_sleep) == 2


def test_cgroup_quota_caps(monkeypatch, four_cpus):
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: 1.5)
    idle = {c: (0, 100) for c in range(4)}
    assert threads.default_num_threads(stat_sampler(idle, idle), no_sleep) == 1


def test_omp_num_threads_wins(monkeypatch, four_cpus):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_num_threads(stat_sampler(), no_sleep) == 3  # no sampling at all
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    idle = {c: (0, 100) for c in range(4)}
    assert threads.default_num_threads(stat_sampler(idle, idle), no_sleep) == 4


def test_no_proc_stat_means_no_load_known(tmp_path, four_cpus):
    assert threads.read_cpu_times(tmp_path / "missing") == {}
    assert threads.default_num_threads(stat_sampler({}, {}), no_sleep) == 4


def test_read_cpu_times_parses_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 10 100 5 0 0 0 0 0\n"
                    "cpu0 4 1 2 50 3 1 1 2 0 0\n"
                    "cpu1 6 0 8 50 2 0 0 0 0 0\n"
                    "intr 12345\nctxt 99\n")
    # busy = user + nice + system + irq + softirq + steal; idle = idle + iowait
    assert threads.read_cpu_times(stat) == {0: (11, 64), 1: (14, 66)}


def test_cgroup_quota_files(tmp_path):
    assert threads.cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert threads.cgroup_cpu_quota(tmp_path) == 2.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert threads.cgroup_cpu_quota(v1) == 0.5


def test_real_machine_gives_a_usable_count(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = threads.default_num_threads()
    assert 1 <= n <= len(threads.allowed_cpus())
