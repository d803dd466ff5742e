"""kernelfit.validate: the one validation module (bandwidth, jitter, probabilities, sizes, ranges)."""

import subprocess
import sys

import numpy as np
import pytest

from kernelfit.errors import InputError
from kernelfit.validate import (
    BandwidthRule,
    bandwidth_rule,
    check_bandwidth,
    check_bandwidth_spec,
    check_choice,
    check_float,
    check_int,
    check_jitter,
    check_params,
    check_positive_int,
    check_probability,
)


def test_import_is_numpy_free():
    code = "import sys, kernelfit.validate; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("text, kind, value", [
    (5.0, "given", 5.0), ("5", "given", 5.0), (np.float32(2.5), "given", 2.5), (3, "given", 3.0),
    ("median", "median", 1.0), (" Median ", "median", 1.0), ("0.5*median", "median", 0.5),
    ("2 * median", "median", 2.0), ("1e-1*median", "median", 0.1),
])
def test_bandwidth_rule_parses(text, kind, value):
    rule = bandwidth_rule(text)
    assert (rule.kind, rule.value) == (kind, value)


@pytest.mark.parametrize("bad", [0, -1.0, "0", "-2", float("nan"), float("inf"), "nan", "0*median", "-1*median",
                                 "x*median", "auto", "mediann", True, np.bool_(True), None, [1.0], 1e-300, 1e300])
def test_bandwidth_rule_refuses(bad):
    with pytest.raises(InputError) as e:
        bandwidth_rule(bad)
    msg = str(e.value)
    assert "bandwidth" in msg and ("expected" in msg or "outside what float64" in msg)


def test_bandwidth_message_says_expected_found_fix():
    with pytest.raises(InputError, match=r"expected .*'F\*median'.*found 'auto'.*Pass e.g."):
        bandwidth_rule("auto")


def test_rule_resolve_and_str():
    r = bandwidth_rule("0.5*median")
    assert r.resolve(4.0) == 2.0 and str(r) == "0.5*median" and r.describe() == "0.5 x median heuristic"
    assert str(bandwidth_rule("median")) == "median" and bandwidth_rule("median").describe() == "median heuristic"
    assert bandwidth_rule(5).resolve() == 5.0 and bandwidth_rule(5).describe() == "given"
    assert bandwidth_rule(BandwidthRule("median", 2.0)) == BandwidthRule("median", 2.0)
    with pytest.raises(InputError):
        bandwidth_rule("median").resolve(None)
    assert check_bandwidth_spec("0.50*median") == "0.5*median" and check_bandwidth_spec("5") == 5.0


def test_check_bandwidth_float64_range():
    assert check_bandwidth(1e-100) == 1e-100
    with pytest.raises(InputError, match="outside what float64"):
        check_bandwidth(1e200)


@pytest.mark.parametrize("value, allow_auto, expected", [(0, False, 0.0), (1e-8, False, 1e-8), ("1e-6", False, 1e-6),
                                                         ("auto", True, "auto"), ("AUTO", True, "auto")])
def test_jitter_ok(value, allow_auto, expected):
    assert check_jitter(value, allow_auto=allow_auto) == expected


@pytest.mark.parametrize("bad, allow_auto", [(-1e-9, False), (float("nan"), False), (float("inf"), True),
                                             ("auto", False), ("x", True), (True, False), (None, True)])
def test_jitter_refuses(bad, allow_auto):
    with pytest.raises(InputError, match="jitter: expected a finite number >= 0"):
        check_jitter(bad, allow_auto=allow_auto)


def test_probability():
    assert check_probability(0) == 0.0 and check_probability("1") == 1.0 and check_probability(np.float64(0.3)) == 0.3
    for bad in (-0.1, 1.5, float("nan"), "half", True):
        with pytest.raises(InputError, match=r"p: expected a probability in \[0, 1\]"):
            check_probability(bad, "p")


def test_ints():
    assert check_positive_int(np.int64(3), "n") == 3 and check_positive_int("7", "n") == 7
    assert check_positive_int(4.0, "n") == 4
    for bad in (0, -1, 2.5, "x", True, None, float("inf")):
        with pytest.raises(InputError, match="n: expected an integer >= 1"):
            check_positive_int(bad, "n")
    assert check_int(0, "k", minimum=0, maximum=3) == 0
    with pytest.raises(InputError, match="k: expected an integer >= 0 and <= 3"):
        check_int(4, "k", minimum=0, maximum=3)


def test_float_range():
    assert check_float(0.5, "x", 0, 1) == 0.5
    with pytest.raises(InputError, match="x: expected a finite number > 0"):
        check_float(0, "x", 0, low_open=True)
    with pytest.raises(InputError, match="finite"):
        check_float(float("nan"), "x")


def test_choice_and_params_table():
    assert check_choice("mixed", ("mixed", "float64"), "mode") == "mixed"
    with pytest.raises(InputError, match="mode: expected one of mixed, float64; found 'fast'"):
        check_choice("fast", ("mixed", "float64"), "mode")
    table = {"n": check_positive_int, "p": check_probability}
    assert check_params({"n": "3", "p": 0.5, "other": object}, table)["n"] == 3
    with pytest.raises(InputError, match="^p: expected"):
        check_params({"n": 3, "p": 2}, table)
