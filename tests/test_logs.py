"""Quieter logs: what we hide is exactly the noise, and everything else still shows."""

from __future__ import annotations

import logging

import pytest

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


@pytest.fixture
def ray_data_logging():
    """Ray Data's own logging configuration, made afresh (earlier tests may have added dataset
    handlers, changed levels or quieted the console), and put back as it was afterwards."""
    import ray.data  # noqa: F401
    from ray.data._internal.logging import configure_logging

    names = ("ray.data", "ray.data._internal.execution.streaming_executor")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in map(logging.getLogger, names)]
    configure_logging()
    logging.getLogger(names[1]).setLevel(logging.NOTSET)
    try:
        yield logging.getLogger(names[1])
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


def test_quiet_ray_data_keeps_warnings_on_the_console(monkeypatch, ray_data_logging):
    handlers = logging.getLogger("ray.data").handlers
    console = [h for h in handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    files = [h for h in handlers if h not in console]
    assert console and files
    got = {h: [] for h in handlers}
    for h in handlers:
        monkeypatch.setattr(h, "emit", lambda r, h=h: got[h].append(r.getMessage()))
    log = ray_data_logging
    log.info("Starting execution of Dataset one")
    for h in console:
        assert got[h] == ["Starting execution of Dataset one"]  # Ray Data's default: INFO on the console
    quiet_ray_data()
    log.info("Starting execution of Dataset two")
    log.warning("a warning that matters")
    for h in console:
        assert got[h] == ["Starting execution of Dataset one", "a warning that matters"]
    assert any("Starting execution of Dataset two" in got[h] for h in files)  # its log file keeps everything


def test_a_progress_bar_s_eta_ignores_the_warm_up():
    """Five minutes before the first 10 rows (a model loading), then 10 rows a second: the ETA is
    the 98 seconds the rows left take, not 990 rows at 30 s each."""
    import io

    from cerbero_ray.logs import progress

    clock, out = [0.0], io.StringIO()
    bar = progress(total=1000, file=out, mininterval=0, miniters=1)
    bar._time = lambda: clock[0]
    clock[0] = 300.0
    bar.update(10)
    assert out.getvalue().split("\r")[-1].endswith("[00:00<?, ?it/s]")
    clock[0] = 301.0
    bar.update(10)
    assert "<01:38, 10.00it/s]" in out.getvalue().split("\r")[-1]
    bar.close()


def test_bitsandbytes_hub_kernel_warning_is_hidden_and_its_errors_are_not():
    """peft imports bitsandbytes, which on CPUs with AVX512-BF16 (this AMD EPYC; Sapphire Rapids
    hosts of H100s) asks the Hub for a CPU kernel and warns when it cannot: hidden after ``quiet()``,
    while that module's errors still show (skipped where there is no such warning to hide)."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    code = "import logging; logging.basicConfig(); {} import bitsandbytes; logging.getLogger('{}').error('boom')"
    name = "bitsandbytes.backends.cpu.ops"
    loud, hushed = (
        subprocess.run([sys.executable, "-c", code.format(q, name)], capture_output=True, text=True, timeout=120)
        for q in ("", "from cerbero_ray.logs import quiet; quiet();")
    )
    if "kernels-community" not in loud.stderr:
        pytest.skip("bitsandbytes printed no Hub-kernel warning on this CPU: nothing to hide")
    assert "boom" in hushed.stderr and "kernels-community" not in hushed.stderr, hushed.stderr
