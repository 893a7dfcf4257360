"""``runtime.launch``, what every job runs: what our code finds wrong is one line and exit status 2;
a failure inside a library keeps its stack; SIGTERM stops a job as Ctrl-C does."""

from __future__ import annotations

import json
import os
import signal

import pytest

from cerbero_ray.config import compose
from cerbero_ray.config.common import one_of
from cerbero_ray.runtime import STOPPED_BY, launch


def _cfg(tmp_path):
    return compose("data", [f"data.output_dir={tmp_path}/out"])


def test_an_error_our_code_raises_is_one_line(tmp_path, capsys):
    def run(c):
        one_of(c.data.packing, ("split",), "data.packing")  # a check of ours, raising from our code

    with pytest.raises(SystemExit) as e:
        launch("data", _cfg(tmp_path), run, ray=False)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data.packing must be one of ('split',), got 'whole'\n"


def test_a_library_error_keeps_its_stack(tmp_path, monkeypatch):
    def run(c):
        return json.loads("{not json")  # raised inside the json module: a bug, not a verdict on the input

    with pytest.raises(ValueError, match="Expecting property name"):
        launch("data", _cfg(tmp_path), run, ray=False)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # and our own errors show their stack on request

    def ours(c):
        one_of(c.data.packing, ("split",), "data.packing")

    with pytest.raises(ValueError, match="data.packing"):
        launch("data", _cfg(tmp_path), ours, ray=False)


def test_sigterm_stops_a_job_as_ctrl_c_does(tmp_path, capsys):
    old = signal.getsignal(signal.SIGTERM)

    def run(c):  # launch has set the handler
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the run")

    try:
        with pytest.raises(SystemExit) as e:
            launch("data", _cfg(tmp_path), run, ray=False)
    finally:
        signal.signal(signal.SIGTERM, old)
        STOPPED_BY.clear()
    assert e.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == (
        "[data] stopped by SIGTERM; the same command starts it again (the unfinished shards are cleared)\n"
    )
