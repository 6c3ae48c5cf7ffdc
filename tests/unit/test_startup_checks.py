"""What the configuration is refused for at start (the state file's folder, soft thresholds a
fresh worker already trips), and a state file that cannot be written while the loop runs."""

import json
import logging
import os

import pytest
from qvl.supervisor.config import Config, ConfigError
from qvl.supervisor.footprint import fresh_worker_footprint
from qvl.supervisor.state import save_state

GIB = 1 << 30


@pytest.fixture
def model_4b(tmp_path):
    """A model folder as `make_model.py --preset qwen3-vl-4b` writes it, weights as sparse files."""
    text = {"num_hidden_layers": 36, "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 2560,
            "num_attention_heads": 32}
    (tmp_path / "config.json").write_text(json.dumps({"text_config": text, "dtype": "bfloat16"}))
    for i, size in enumerate((5 * GIB, 3 * GIB + GIB // 2)):
        with open(tmp_path / f"model-0000{i + 1}.safetensors", "wb") as f:
            f.truncate(size)
    return tmp_path


def test_static_kv_pool_and_weights_are_read_from_the_folder(model_4b):
    fp = fresh_worker_footprint(str(model_4b), "cuda:0", "auto", 32768, "auto")
    assert fp.kv_pool_bytes == 36 * 8 * 128 * 2 * 32768 * 2 == int(4.5 * GIB)
    assert fp.weights_bytes == int(8.5 * GIB)
    assert fresh_worker_footprint(str(model_4b), "cpu", "auto", 32768, "auto").kv_pool_bytes == 0
    assert fresh_worker_footprint("Qwen/Qwen3-VL-4B-Instruct", "cuda:0", "auto", 32768, "auto") is None


def test_a_reserved_threshold_below_a_fresh_worker_is_refused_with_the_numbers(model_4b):
    with pytest.raises(ConfigError) as refused:
        Config(model=str(model_4b), recycle_reserved_bytes=44 * GIB).validate()
    message = str(refused.value)  # the default pool: 262 144 tokens
    assert "recycle_reserved_bytes" in message and "36.00 GiB" in message and "8.50 GiB" in message
    assert "36 layers x 8 kv heads x 128 head dim x 2 x 262144 tokens x 2 bytes" in message
    Config(model=str(model_4b), recycle_reserved_bytes=45 * GIB).validate()  # above 44.5 GiB: fine
    Config(model=str(model_4b), recycle_reserved_bytes=0).validate()  # 0: off
    Config(model=str(model_4b), recycle_reserved_bytes=12 * GIB, kv_cache_tokens=8192).validate()


def test_the_state_files_folder_is_checked_at_start(tmp_path):
    Config(state_file=str(tmp_path / "state.json")).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        Config(state_file=str(tmp_path / "missing" / "state.json")).validate()
    with pytest.raises(ConfigError, match="is a folder"):
        Config(state_file=str(tmp_path)).validate()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"):
            Config(state_file=str(locked / "state.json")).validate()


@pytest.mark.parametrize("name", ["start_timeout_s", "request_hang_timeout_s", "heartbeat_interval_s"])
def test_zero_is_refused_where_it_does_not_mean_off(name):
    with pytest.raises(ConfigError, match=name):
        Config(**{name: 0.0}).validate()


def test_a_failed_save_is_logged_and_never_raises(tmp_path, caplog):
    folder = tmp_path / "gone"
    folder.mkdir()
    path = folder / "state.json"

    class Slot:
        index = 0

        def saved(self):
            return {"restarts": 1}

    assert save_state(str(path), [Slot()], {"answered": 3}) is True
    assert json.loads(path.read_text())["slots"]["0"] == {"restarts": 1}
    path.unlink()
    folder.rmdir()  # the folder vanished while the supervisor runs
    with caplog.at_level(logging.ERROR, logger="qvl.supervisor"):
        assert save_state(str(path), [Slot()], {}) is False
    assert "event=state_save_failed" in caplog.text
