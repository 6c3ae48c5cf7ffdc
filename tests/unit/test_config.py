"""Configuration: flags over TOML over defaults, and validation that names every fault."""

import argparse

import pytest

from qvl.supervisor.config import FIELDS, Config, ConfigError, add_arguments, load_config


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_config(parser.parse_args(list(argv)))


def test_defaults():
    assert parse() == Config()


def test_toml_then_flags(tmp_path):
    path = tmp_path / "qvl.toml"
    path.write_text('workers = 3\nqueue_size = 10\nstop_grace_s = 2\nmodel = "/m"\n')
    config = parse("--config", str(path), "--queue-size", "20")
    assert (config.workers, config.queue_size, config.stop_grace_s, config.model) == (3, 20, 2.0, "/m")


def test_every_fault_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('workers = 0\ndevice = "tpu"\nmemory_fraction = 2.0\nfrontend = "http://x"\n')
    with pytest.raises(ConfigError) as info:
        parse("--config", str(path))
    text = str(info.value)
    for name in ("workers", "device", "memory_fraction", "frontend"):
        assert name in text


@pytest.mark.parametrize("toml, message", [
    ("qeue_size = 3", "unknown settings: qeue_size"),
    ('workers = "two"', "workers must be of type int"),
    ("workers = [", "cannot read"),
])
def test_bad_files(tmp_path, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        parse("--config", str(path))


def test_readme_has_the_generated_table():
    """The README's configuration table is exactly what the declaration prints."""
    import subprocess
    import sys

    from harness import ROOT

    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_table.py")],
                           capture_output=True, text=True, check=True).stdout
    assert table.count("\n") == len(FIELDS) + 2
    assert table in (ROOT / "README.md").read_text()


def test_documented_toml_has_every_key_and_loads():
    """docs/qvl.toml is generated, names every setting, and parses to the defaults."""
    from harness import ROOT

    import subprocess
    import sys

    path = ROOT / "docs" / "qvl.toml"
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "config_table.py"), "--toml"],
                               capture_output=True, text=True, check=True).stdout
    assert path.read_text() == generated
    keys = {line.split(" = ")[0] for line in path.read_text().splitlines() if " = " in line and not line.startswith("#")}
    assert keys == set(FIELDS)
    assert parse("--config", str(path)) == Config()


def test_the_vllm_engine_needs_cuda_and_a_share_of_the_device():
    with pytest.raises(ConfigError) as info:
        parse("--engine", "vllm", "--device", "cpu", "--vllm-memory-share", "1.0")
    assert "engine vllm needs a cuda device" in str(info.value)
    assert "vllm_memory_share must be between 0 and 1" in str(info.value)
    config = parse("--engine", "vllm", "--vllm-memory-share", "0.3", "--vllm-compile", "off")
    assert (config.engine, config.vllm_memory_share, config.vllm_compile) == ("vllm", 0.3, False)


def test_the_worker_spec_carries_the_vllm_settings():
    from qvl.supervisor.slots import worker_spec

    config = parse("--engine", "vllm", "--vllm-memory-share", "0.3", "--vllm-max-model-len", "4096",
                   "--vllm-render-processes", "6")
    model = worker_spec(config, "ipc://x", 0, 1).model
    assert (model.engine, model.vllm_memory_share, model.vllm_max_model_len, model.vllm_compile,
            model.vllm_render_processes) == ("vllm", 0.3, 4096, True, 6)
    assert worker_spec(parse("--engine", "vllm"), "ipc://x", 0, 1).model.vllm_render_processes == 0


@pytest.mark.parametrize("count, fault", [("-1", "vllm_render_processes must not be negative"),
                                          ("65", "vllm_render_processes must be at most 64")])
def test_render_processes_are_counted_sensibly(count, fault):
    with pytest.raises(ConfigError, match=fault):
        parse("--engine", "vllm", "--vllm-render-processes", count)


def test_the_image_pool_has_a_thread_for_every_render_process():
    from qvl.protocol.contract import ModelOptions
    from qvl.worker.engine import image_threads

    assert image_threads(ModelOptions("m", engine="vllm", vllm_render_processes=6)) == 6
    assert image_threads(ModelOptions("m", engine="vllm", vllm_render_processes=0)) == 2
    assert image_threads(ModelOptions("m", engine="hf", vllm_render_processes=6)) == 2
