"""Quieter logs: what we hide is exactly the noise, and everything else still shows."""

from __future__ import annotations

import logging

from cerbero_ray.logs import drop_lines, quiet_ray_data


def test_drop_lines_drops_only_matching_lines_in_order(capsys):
    with drop_lines(r"^DeepSpeed \S+ built successfully$"):
        print("before")
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a DeepSpeed x built successfully line with more around it")
        print("partial", end="")  # no newline: still printed when the block ends
        print(" line", end="")
    print("after")
    assert capsys.readouterr().out == (
        "before\na DeepSpeed x built successfully line with more around it\npartial lineafter\n"
    )


def test_drop_lines_matches_prints_turned_into_log_records(caplog):
    """Ray Train's workers patch print() into ``logging.getLogger().log(INFO, message)``."""
    root = logging.getLogger()
    with caplog.at_level(logging.INFO):
        with drop_lines(r"built successfully$"):
            root.info("DeepSpeed op built successfully")
            root.info("step 1")
        root.info("DeepSpeed op built successfully")  # outside the block: kept
    assert [r.getMessage() for r in caplog.records] == ["step 1", "DeepSpeed op built successfully"]


def test_quiet_ray_data_keeps_warnings_on_the_console(monkeypatch):
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    handlers = logging.getLogger("ray.data").handlers
    console = [h for h in handlers if isinstance(h, logging.StreamHandler)]
    files = [h for h in handlers if h not in console]
    assert console and files
    shown, kept = [], []
    for h in handlers:
        monkeypatch.setattr(h, "level", logging.INFO if h in console else logging.NOTSET)  # Ray Data's own
        monkeypatch.setattr(h, "emit", lambda r, to=shown if h in console else kept: to.append(r.getMessage()))
    log = logging.getLogger("ray.data._internal.execution.streaming_executor")
    log.info("Starting execution of Dataset one")
    assert shown == ["Starting execution of Dataset one"]  # Ray Data's default: INFO on the console
    quiet_ray_data()
    log.info("Starting execution of Dataset two")
    log.warning("a warning that matters")
    assert shown == ["Starting execution of Dataset one", "a warning that matters"]
    assert "Starting execution of Dataset two" in kept  # its log file keeps everything
