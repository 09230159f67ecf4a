"""What a newcomer's console shows from Ray: Ray Data's console handler, Ray Train's console level and its
per-epoch "Reporting training result" logger are at WARNING unless XAI_RAY_LOGS=1 (pipelines.common)."""

import logging

import pytest

from pipelines import common


@pytest.fixture()
def restore_levels():
    import ray.data  # noqa: F401 - its logging is configured at import
    from ray.train.v2._internal.execution import context

    console = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    report = logging.getLogger(context.__file__)
    saved = [h.level for h in console], report.level
    for h in console:  # as Ray Data configures it (a pipeline run in this process may have quieted it)
        h.setLevel(logging.INFO)
    report.setLevel(logging.NOTSET)
    yield console, report
    for h, level in zip(console, saved[0], strict=True):
        h.setLevel(level)
    report.setLevel(saved[1])


def test_ray_info_lines_are_left_out_of_the_console_by_default(restore_levels, monkeypatch):
    console, report = restore_levels
    monkeypatch.delenv(common.RAY_LOGS_ENV, raising=False)
    assert len(console) == 1
    common.quiet_ray_console()
    common.quiet_train_worker()
    assert console[0].level == logging.WARNING  # INFO records (progress tables, plans) stop there; warnings pass
    assert not report.isEnabledFor(logging.INFO) and report.isEnabledFor(logging.WARNING)
    assert common.train_log_level() == "WARNING"


def test_xai_ray_logs_keeps_rays_info_lines(restore_levels, monkeypatch):
    console, report = restore_levels
    monkeypatch.delenv(common.RAY_LOGS_ENV, raising=False)
    common.quiet_ray_console()  # quieted first, as by an earlier run in this process
    common.quiet_train_worker()
    monkeypatch.setenv(common.RAY_LOGS_ENV, "1")
    common.quiet_ray_console()
    common.quiet_train_worker()
    assert console[0].level == logging.INFO and report.level == logging.NOTSET
    assert common.train_log_level() == "INFO"
