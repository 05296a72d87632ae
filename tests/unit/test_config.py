"""Configuration precedence: flags over environment over TOML file over defaults."""

import pytest

from snapshotd.common.config import ConfigError, build_config, parse_size

pytestmark = pytest.mark.timeout(30)


def test_defaults(tmp_path):
    cfg = build_config([], environ={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert cfg.keep == 2 and cfg.node_slot == 0
    assert cfg.control == f"ipc://{tmp_path}/snapshotd/control.sock"
    assert cfg.shm_dir == "/dev/shm/snapshotd-0"


def test_flags_beat_env_beat_file(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text('keep = 5\nmemory_limit = "1GiB"\nnode_slot = 2\nlog_level = "DEBUG"\n')
    env = {"SNAPSHOTD_KEEP": "4", "SNAPSHOTD_MEMORY_LIMIT": "2GiB"}
    cfg = build_config(["--config", str(conf), "--keep", "3"], environ=env)
    assert cfg.keep == 3                      # flag
    assert cfg.memory_limit == 2 << 30        # env over file
    assert cfg.node_slot == 2                 # file
    assert cfg.log_level == "DEBUG"
    assert cfg.shm_dir == "/dev/shm/snapshotd-2"


def test_boolean_flag_and_env():
    assert build_config(["--no-adopt"], environ={}).adopt is False
    assert build_config([], environ={"SNAPSHOTD_ADOPT": "no"}).adopt is False


@pytest.mark.parametrize("argv, needle", [
    (["--keep", "0"], "keep must be >= 1"),
    (["--memory-limit", "lots"], "cannot read 'lots' as a size"),
    (["--control", "/tmp/x"], "must start with ipc://"),
    (["--keep", "two"], "setting keep='two'"),
    (["--log-level", "LOUD"], "log_level"),
])
def test_bad_values_name_the_setting(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        build_config(argv, environ={})


def test_unknown_file_setting(tmp_path):
    conf = tmp_path / "c.toml"
    conf.write_text("kep = 3\n")
    with pytest.raises(ConfigError, match="unknown settings \\['kep'\\]"):
        build_config(["--config", str(conf)], environ={})


@pytest.mark.parametrize("text, value", [
    ("4GiB", 4 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("1024", 1024),
    ("2 kib", 2048)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_peers_without_keys_refuse_to_start(tmp_path):
    import zmq
    from prometheus_client import CollectorRegistry

    from snapshotd.cluster.start import start_cluster
    from snapshotd.common.metrics import Metrics
    from snapshotd.node.store import Store

    cfg = build_config(["--peers", "0=127.0.0.1:1,1=127.0.0.1:2", "--k", "1", "--m", "1"],
                       environ={})
    store = Store(str(tmp_path / "shm"), 1 << 20)
    with pytest.raises(ConfigError, match="snapshotctl keygen"):
        start_cluster(cfg, store, zmq.Context.instance(), Metrics(CollectorRegistry()))


@pytest.mark.parametrize("argv, needle", [
    (["--peers", "0=a:1,2=b:2"], "slots 0..N-1"),
    (["--peers", "0=a:1,x"], "is not slot=host:port"),
    (["--peers", "1=a:1", "--node-slot", "0"], "not this node's slot 0"),
    (["--peers", "n{slot}:1"], "needs --nodes"),
    (["--peers", "0=a:1,1=b:1", "--k", "4", "--m", "2", "--insecure"], "too small"),
])
def test_bad_peer_settings_are_named(tmp_path, argv, needle):
    import zmq
    from prometheus_client import CollectorRegistry

    from snapshotd.cluster.start import start_cluster
    from snapshotd.common.metrics import Metrics
    from snapshotd.node.store import Store

    with pytest.raises(ConfigError, match=needle):
        start_cluster(build_config(argv, environ={}), Store(str(tmp_path / "s"), 1 << 20),
                      zmq.Context.instance(), Metrics(CollectorRegistry()))
