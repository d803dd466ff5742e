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
