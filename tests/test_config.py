"""Options from the URL query, keyword arguments and CYLON_STORE_* environment variables:
precedence, coercion, and errors that name the option (and list the valid ones)."""

from __future__ import annotations

import os
import pickle

import pytest

import cylon_store as cs
from cylon_store.config import (StoreOptions, build_options, option_names, parse_size,
                                split_url)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    # The tests set their own CYLON_STORE_* variables; the runner's must not leak in.
    for var in list(os.environ):
        if var.startswith("CYLON_STORE_") and not var.startswith("CYLON_STORE_TEST_"):
            monkeypatch.delenv(var)


def file_url(tmp_path, query=""):
    return f"file://{tmp_path}/store" + (f"?{query}" if query else "")


def test_options_from_url_query():
    with cs.open_store("memory://?compression=zstd&segment_size=64KiB&retries=3&retry_base=0.01") as s:
        assert s.options.compression == "zstd"
        assert s.options.segment_size == 64 << 10
        assert s.options.retries == 3 and s.options.retry_base == 0.01


def test_options_from_kwargs(tmp_path):
    with cs.open_store(file_url(tmp_path), compression="lz4", segment_size=1 << 20, fsync=False) as s:
        assert s.options.compression == "lz4" and s.options.segment_size == 1 << 20
        assert s.adapter_config.fsync is False


def test_options_from_environment(monkeypatch, tmp_path):
    """Options of every backend are CYLON_STORE_<OPTION>; a backend's own are namespaced,
    CYLON_STORE_<SCHEME>_<OPTION>, and another backend's namespace is left alone."""
    monkeypatch.setenv("CYLON_STORE_COMPRESSION", "zstd")
    monkeypatch.setenv("CYLON_STORE_SEGMENT_SIZE", "1MiB")
    monkeypatch.setenv("CYLON_STORE_FILE_FSYNC", "false")
    monkeypatch.setenv("CYLON_STORE_REDIS_CHUNK_SIZE", "1MiB")
    with cs.open_store(file_url(tmp_path)) as s:
        assert s.options.compression == "zstd" and s.options.segment_size == 1 << 20
        assert s.adapter_config.fsync is False
    with cs.open_store("memory://") as s:
        assert s.options.compression == "zstd"
    monkeypatch.setenv("CYLON_STORE_FILE_FSINK", "false")
    with pytest.raises(cs.ConfigError, match="CYLON_STORE_FILE_FSINK.*fsync"):
        cs.open_store(file_url(tmp_path))


def test_flat_backend_option_in_environment_is_deprecated(monkeypatch, tmp_path):
    monkeypatch.setenv("CYLON_STORE_FSYNC", "false")
    with pytest.warns(DeprecationWarning, match="CYLON_STORE_FILE_FSYNC"):
        with cs.open_store(file_url(tmp_path)) as s:
            assert s.adapter_config.fsync is False
    # FSYNC belongs to the file backend: a memory store leaves it alone instead of failing
    with cs.open_store("memory://") as s:
        assert s.options.retries >= 1
    monkeypatch.setenv("CYLON_STORE_FILE_FSYNC", "true")  # the namespaced one wins
    with pytest.warns(DeprecationWarning):
        with cs.open_store(file_url(tmp_path)) as s:
            assert s.adapter_config.fsync is True


def test_precedence_kwargs_over_query_over_env(monkeypatch):
    monkeypatch.setenv("CYLON_STORE_COMPRESSION", "lz4")
    monkeypatch.setenv("CYLON_STORE_RETRIES", "7")
    with cs.open_store("memory://?compression=zstd&retries=2", retries=9) as s:
        assert s.options.compression == "zstd"   # query beats env
        assert s.options.retries == 9            # kwarg beats query
    with cs.open_store("memory://") as s:
        assert s.options.compression == "lz4" and s.options.retries == 7
    with cs.open_store("memory://?compression=") as s:  # an empty value means None
        assert s.options.compression is None


@pytest.mark.parametrize("how", ["kwargs", "query"])
def test_unknown_option_names_it_and_lists_valid_ones(how, tmp_path):
    url = file_url(tmp_path, "bogus_opt=1" if how == "query" else "")
    kwargs = {"bogus_opt": 1} if how == "kwargs" else {}
    with pytest.raises(cs.ConfigError) as info:
        cs.open_store(url, **kwargs)
    msg = str(info.value)
    assert "'bogus_opt'" in msg
    for valid in ("compression", "segment_size", "retries", "fsync", "mkdir"):
        assert valid in msg
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "store").exists(), "a bad option must not create anything"


def test_option_of_another_backend_is_unknown_here():
    with pytest.raises(cs.ConfigError, match="'fsync'"):
        cs.open_store("memory://", fsync=False)


def test_unknown_environment_variable_names_it(monkeypatch):
    monkeypatch.setenv("CYLON_STORE_COMPRESSON", "zstd")  # a typo
    with pytest.raises(cs.ConfigError) as info:
        cs.open_store("memory://")
    assert "CYLON_STORE_COMPRESSON" in str(info.value) and "compression" in str(info.value)


@pytest.mark.parametrize("var", ["CYLON_STORE_RANK", "CYLON_STORE_WORLD_SIZE", "CYLON_STORE_JOB",
                                 "CYLON_STORE_TEST_BACKENDS", "CYLON_STORE_TEST_ANYTHING",
                                 "CYLON_STORE_BENCH_QUICK", "CYLON_STORE_BENCH_SIZES"])
def test_reserved_environment_variables_are_not_options(monkeypatch, var):
    monkeypatch.setenv(var, "1")
    with cs.open_store("memory://") as s:
        assert s.options == StoreOptions()


@pytest.mark.parametrize("kwargs, name", [
    ({"compression": "gzip"}, "compression"),
    ({"compression": 1}, "compression"),
    ({"segment_size": "lots"}, "segment_size"),
    ({"segment_size": 100}, "segment_size"),
    ({"segment_size": True}, "segment_size"),
    ({"retries": 0}, "retries"),
    ({"retries": "many"}, "retries"),
    ({"retries": True}, "retries"),
    ({"retry_base": -1.0}, "retry_base"),
    ({"retry_base": 1.0, "retry_cap": 0.5}, "retry_cap"),
    ({"concurrency": 0}, "concurrency"),
    ({"fsync": "maybe"}, "fsync"),
    ({"mkdir": 2.5}, "mkdir"),
])
def test_bad_values_name_the_option(kwargs, name, tmp_path):
    with pytest.raises(cs.ConfigError, match=name):
        cs.open_store(file_url(tmp_path), **kwargs)
    assert not (tmp_path / "store").exists()


def test_bad_values_from_query_and_environment(monkeypatch):
    with pytest.raises(cs.ConfigError, match="retries"):
        cs.open_store("memory://?retries=x")
    with pytest.raises(cs.ConfigError, match="given twice"):
        cs.open_store("memory://?retries=1&retries=2")
    monkeypatch.setenv("CYLON_STORE_SEGMENT_SIZE", "big")
    with pytest.raises(cs.ConfigError, match="segment_size"):
        cs.open_store("memory://")


@pytest.mark.parametrize("text, value", [
    ("4096", 4096), (8192, 8192), ("64KiB", 64 << 10), ("64kib", 64 << 10), ("1MiB", 1 << 20),
    ("1.5GiB", 3 << 29), ("2MB", 2_000_000), ("10k", 10_000), ("7 b", 7), (" 1 TiB ", 1 << 40),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "MiB", "1XB", "-5", "1 2", True])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("url", ["", "memory", "no-scheme/path", 42, None, "://nothing"])
def test_bad_urls(url):
    with pytest.raises(cs.ConfigError):
        cs.open_store(url)


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(cs.ConfigError) as info:
        cs.open_store("nosuch://bucket")
    assert "'nosuch'" in str(info.value) and "memory" in str(info.value) and "file" in str(info.value)


def test_file_url_errors_write_nothing(tmp_path):
    with pytest.raises(cs.ConfigError, match="absolute"):
        cs.open_store("file://relative/dir")
    missing = tmp_path / "missing"
    with pytest.raises(cs.ConfigError, match="not a directory"):
        cs.open_store(f"file://{missing}?mkdir=false")
    assert not missing.exists()
    with pytest.raises(cs.ConfigError):
        cs.open_store(f"file://{missing}?fsync=perhaps")
    assert not missing.exists()


def test_memory_name_is_validated():
    with pytest.raises(cs.ConfigError, match="name"):
        cs.open_store("memory://bad name!")


def test_options_survive_pickle(monkeypatch, tmp_path):
    with cs.open_store(file_url(tmp_path, "segment_size=128KiB"), compression="zstd",
                       fsync=False) as s:
        clone = pickle.loads(pickle.dumps(s))
        assert clone.options == s.options and clone.adapter_config == s.adapter_config
        clone.close()


def test_open_store_passes_a_store_through():
    with cs.open_store("memory://") as s:
        assert cs.open_store(s) is s
        with pytest.raises(cs.ConfigError, match="already open"):
            cs.open_store(s, compression="zstd")


def test_split_url_and_option_names():
    assert split_url("file:///a/b?x=1&y=") == ("file", "file:///a/b", {"x": "1", "y": ""})
    assert split_url("S3://bucket/p")[0] == "s3"
    names = option_names(StoreOptions)
    assert {"compression", "segment_size", "retries", "retry_base", "retry_cap", "concurrency"} <= set(names)


def test_build_options_reads_the_given_environment():
    (opts,) = build_options([StoreOptions], kwargs={}, query={},
                            env={"CYLON_STORE_RETRIES": "4", "OTHER": "x"})
    assert opts.retries == 4
    with pytest.raises(cs.ConfigError, match="CYLON_STORE_NOPE"):
        build_options([StoreOptions], kwargs={}, query={}, env={"CYLON_STORE_NOPE": "1"})
    (opts,) = build_options([StoreOptions], kwargs={}, query={}, env={"CYLON_STORE_NOPE": "1"},
                            known_env=lambda: ["nope"])
    assert opts == StoreOptions()
