"""Progress output: a bar only on a terminal, one line per phase otherwise."""

import io

from kernelfit.progress import PhaseLines, progress_bar


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_redirected_stream_gets_one_line_per_phase_and_no_carriage_returns():
    out = io.StringIO()
    bar = progress_bar(total=3e9, desc="cholesky", unit="flop", stream=out)
    assert isinstance(bar, PhaseLines)
    for _ in range(1000):
        bar.update(3e6)
    bar.close()
    bar.close()  # a second close prints nothing
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0] == "[kernelfit] cholesky: started (3 Gflop)"
    assert lines[1].startswith("[kernelfit] cholesky: done 3 Gflop in ")


def test_terminal_gets_a_tqdm_bar():
    from tqdm import tqdm

    out = _Tty()
    bar = progress_bar(total=10, desc="gram", stream=out)
    assert isinstance(bar, tqdm)
    bar.update(10)
    bar.close()


def test_disabled_returns_none():
    assert progress_bar(total=1, desc="x", enabled=False) is None


def _records(name="kernelfit"):
    import logging

    got = []

    class H(logging.Handler):
        def emit(self, record):
            got.append(record)

    h = H(level=logging.DEBUG)
    logging.getLogger(name).addHandler(h)
    return got, lambda: logging.getLogger(name).removeHandler(h)


def test_verbosity_levels_filter_the_kernelfit_and_deepfit_loggers(capsys):
    import logging

    from kernelfit.progress import get_logger, set_verbosity

    try:
        for v, shown in ((-1, {"warn"}), (0, {"warn", "info"}), (2, {"warn", "info", "debug"})):
            set_verbosity(v)
            for name in ("kernelfit.data", "deepfit"):
                log = get_logger(name)
                log.warning("warn")
                log.info("info")
                log.debug("debug")
            err = capsys.readouterr().err.splitlines()
            assert {line.split("] ")[-1].split(": ")[-1] for line in err} == shown
            assert any(line.startswith("[deepfit] ") for line in err) and any(line.startswith("[kernelfit] ") for line in err)
        assert logging.getLogger("kernelfit").level == logging.DEBUG
    finally:
        set_verbosity(0)


def test_quiet_gives_phase_lines_without_output_and_no_bar_even_on_a_terminal(capsys):
    from kernelfit.progress import set_verbosity

    try:
        set_verbosity(-1)
        bar = progress_bar(total=10, desc="gram", stream=_Tty())
        assert isinstance(bar, PhaseLines)
        bar.update(10)
        bar.close()
        bar = progress_bar(total=10, desc="gram")
        bar.close()
        assert capsys.readouterr().err == ""
    finally:
        set_verbosity(0)


def test_a_long_phase_logs_a_line_every_few_seconds(monkeypatch):
    import kernelfit.progress as P

    clock = [0.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock[0])
    got, undo = _records()
    try:
        bar = P.progress_bar(total=100, desc="decode", unit="img", stream=None)
        for _ in range(100):
            clock[0] += 0.5   # 50 s in all: a line at least every HEARTBEAT_S seconds
            bar.update(1)
        bar.close()
    finally:
        undo()
    msgs = [r.getMessage() for r in got]
    assert msgs[0] == "decode: started (100 img)" and msgs[-1].startswith("decode: done 100 img in 50.0 s")
    assert len(msgs) - 2 == int(50 / P.HEARTBEAT_S)
    assert "decode: 10 img of 100 img (5 s)" in msgs
