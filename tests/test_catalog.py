"""kernelfit.catalog: one cache root and one environment variable for every cache."""

import pytest

from kernelfit.catalog import cache_root


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("KERNELFIT_CACHE", "KERNELFIT_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def _all_roots():
    from kernelfit.features.cache import FeatureCache, GramCache

    return {cache_root(), FeatureCache().root, GramCache().root}


def test_one_variable_for_every_cache(clean_env, tmp_path):
    clean_env.setenv("KERNELFIT_CACHE", str(tmp_path / "c"))
    assert _all_roots() == {tmp_path / "c"}


def test_old_variable_still_read_with_a_notice(clean_env, tmp_path):
    clean_env.setenv("KERNELFIT_CACHE_DIR", str(tmp_path / "old"))
    with pytest.warns(FutureWarning, match=r"KERNELFIT_CACHE_DIR is deprecated; set \$KERNELFIT_CACHE="):
        roots = _all_roots()
    assert roots == {tmp_path / "old"}


def test_new_variable_wins_without_notice(clean_env, tmp_path, recwarn):
    clean_env.setenv("KERNELFIT_CACHE_DIR", str(tmp_path / "old"))
    clean_env.setenv("KERNELFIT_CACHE", str(tmp_path / "new"))
    assert _all_roots() == {tmp_path / "new"}
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_default_is_the_user_cache_dir(clean_env, tmp_path):
    assert _all_roots() == {tmp_path / "home" / ".cache" / "kernelfit"}
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _all_roots() == {tmp_path / "xdg" / "kernelfit"}


def test_default_bandwidth_one_valid_rule_per_feature_map():
    from kernelfit.catalog import DEFAULT_BANDWIDTH, FEATURE_KINDS
    from kernelfit.validate import bandwidth_rule

    assert set(DEFAULT_BANDWIDTH) == set(FEATURE_KINDS)
    assert all(bandwidth_rule(rule).is_median for rule in DEFAULT_BANDWIDTH.values())
