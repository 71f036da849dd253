"""Server configuration: defaults < TOML file < EMBEDSERVE_* variables; bad values are named."""

from __future__ import annotations

import pytest

from embedserve.config import ConfigError, ServeConfig, load_config, unknown_variables


def test_defaults_without_environment_or_file():
    cfg = load_config(environ={})
    assert cfg == ServeConfig()
    assert cfg.device == "auto" and cfg.variant == "auto" and cfg.index is None


def test_environment_wins_over_the_file_which_wins_over_defaults(tmp_path):
    file = tmp_path / "serve.toml"
    file.write_text('device = "cpu"\nmax_batch_size = 16\nmax_k = 5\n')
    cfg = load_config(environ={"EMBEDSERVE_CONFIG": str(file), "EMBEDSERVE_MAX_BATCH_SIZE": "8"})
    assert cfg.device == "cpu"  # from the file
    assert cfg.max_batch_size == 8  # the variable beats the file
    assert cfg.max_k == 5
    assert cfg.max_latency_ms == ServeConfig().max_latency_ms  # default


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"EMBEDSERVE_DEVICE": "tpu"}, "device must be one of auto, cuda, cpu"),
        ({"EMBEDSERVE_VARIANT": "int4"}, "variant must be one of"),
        (
            {"EMBEDSERVE_MAX_BATCH_SIZE": "lots"},
            "EMBEDSERVE_MAX_BATCH_SIZE: max_batch_size must be an integer",
        ),
        ({"EMBEDSERVE_MAX_BATCH_SIZE": "1"}, "max_batch_size must be at least 2"),
        ({"EMBEDSERVE_THREADS": "0"}, "threads must be at least 1"),
        ({"EMBEDSERVE_CONFIG": "/no/such/file.toml"}, "does not exist"),
        (
            {"EMBEDSERVE_MAX_INFLIGHT_BYTES": "1000", "EMBEDSERVE_MAX_REQUEST_BYTES": "2000"},
            r"max_inflight_bytes \(1000\) must be at least max_request_bytes \(2000\)",
        ),
    ],
)
def test_a_bad_setting_is_refused_by_name(environ, words):
    with pytest.raises(ConfigError, match=words):
        load_config(environ=environ)


def test_an_unknown_setting_in_the_file_is_refused(tmp_path):
    file = tmp_path / "serve.toml"
    file.write_text("max_batchsize = 16\n")
    with pytest.raises(ConfigError, match="unknown setting.*max_batchsize"):
        load_config(environ={"EMBEDSERVE_CONFIG": str(file)})


def test_misspelt_variables_are_reported():
    environ = {"EMBEDSERVE_DEVISE": "cpu", "EMBEDSERVE_DEVICE": "cpu", "EMBEDSERVE_CONFIG": "x"}
    assert unknown_variables(environ) == ["EMBEDSERVE_DEVISE"]


def test_threads_default_to_the_cores_shared_among_workers(monkeypatch):
    monkeypatch.setattr("embedserve.config.cpu_count", lambda: 8)
    assert ServeConfig(workers=2).intra_op_threads == 4
    assert ServeConfig(workers=16).intra_op_threads == 1
    assert ServeConfig(workers=2, threads=3).intra_op_threads == 3


@pytest.mark.parametrize(("raw", "value"), [("0", False), ("off", False), ("TRUE", True)])
def test_switches_read_the_usual_spellings(raw, value):
    assert load_config(environ={"EMBEDSERVE_ACCESS_LOG": raw}).access_log is value


def test_a_switch_with_another_value_is_refused():
    with pytest.raises(ConfigError, match="access_log must be true or false"):
        load_config(environ={"EMBEDSERVE_ACCESS_LOG": "maybe"})


def test_the_api_key_is_never_shown():
    cfg = load_config(environ={"EMBEDSERVE_API_KEY": "s3cret-s3cret-s3cret"})
    assert cfg.api_key == "s3cret-s3cret-s3cret"
    assert "s3cret" not in repr(cfg) and "s3cret" not in str(cfg.public())
    assert cfg.public()["auth"] == "api key required"
    assert ServeConfig().public()["auth"] == "open"


def test_milvus_settings_are_read_and_the_token_never_shown():
    env = {
        "EMBEDSERVE_INDEX": "http://milvus:19530",
        "EMBEDSERVE_MILVUS_COLLECTION": "photos",
        "EMBEDSERVE_MILVUS_TOKEN": "root:t0ken-t0ken",
    }
    cfg = load_config(environ=env)
    assert (cfg.index, cfg.milvus_collection, cfg.milvus_token) == (
        "http://milvus:19530",
        "photos",
        "root:t0ken-t0ken",
    )
    assert "t0ken" not in repr(cfg) and "t0ken" not in str(cfg.public())
    assert ServeConfig().milvus_collection == "embedserve" and unknown_variables(env) == []


def test_a_short_api_key_is_refused_without_repeating_it():
    with pytest.raises(ConfigError, match="at least 16 characters, not 6") as error:
        load_config(environ={"EMBEDSERVE_API_KEY": "abc123"})
    assert "abc123" not in str(error.value)


def test_an_empty_api_key_means_none():
    assert load_config(environ={"EMBEDSERVE_API_KEY": ""}).api_key is None


def test_thumbnails_are_on_by_default_and_0_turns_them_off():
    assert ServeConfig().thumbnails == 128
    assert load_config(environ={"EMBEDSERVE_THUMBNAILS": "0"}).thumbnails == 0
    assert load_config(environ={"EMBEDSERVE_THUMBNAILS": "256"}).thumbnails == 256
    for bad, words in (("-1", r"thumbnails must be 0 \(none\) or a size"), ("big", "an integer")):
        with pytest.raises(ConfigError, match=words):
            load_config(environ={"EMBEDSERVE_THUMBNAILS": bad})
    with pytest.raises(ConfigError, match="up to 1024"):
        ServeConfig(thumbnails=4096)
