"""node.config: defaults, precedence, and refusals that name the offending key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from node.config import NodeConfig, load_config
from node.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_empty_file_gives_defaults_and_derived_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.node.ae_title == "LUMBARNODE"
    assert config.node.port == 11112
    assert config.series.quiet_seconds == 10.0
    assert config.routing.modalities == ("MR",)
    assert config.callers.allow_any_loopback is True
    assert config.ai.weights_dir is None
    assert config.ai.mirror is False
    # relative state_dir resolves against the config file's directory
    assert config.state_dir == (tmp_path / "state").resolve()
    assert config.index_path == config.state_dir / "index.sqlite"
    assert config.spool_dir == config.state_dir / "spool"
    assert config.results_dir.parent == config.outbox_dir.parent == config.state_dir
    assert config.source == (tmp_path / "node.toml").resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[node]\nprot = 1\n", "node.prot"),
        ("[nodes]\nport = 1\n", "nodes"),
        ("[[destinations]]\nname='a'\nae_title='A'\nhost='127.0.0.1'\nport=1\ncolour='red'\n", "destinations[0].colour"),
        ("[[callers.allowed]]\nae_title='PACS'\naddr='10.0.0.1'\n", "callers.allowed[0].addr"),
    ],
)
def test_unknown_key_is_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: unknown key"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[node]\nport = 'eleven'\n", "node.port"),
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\nmax_pdu = 0\n", "node.max_pdu"),
        ("[node]\nae_title = 'THIS_TITLE_IS_TOO_LONG'\n", "node.ae_title"),
        ("[node]\nhost = 'not-an-ip'\n", "node.host"),
        ("[node]\ncheck_called_ae = 1\n", "node.check_called_ae"),
        ("[series]\nquiet_seconds = -1\n", "series.quiet_seconds"),
        ("[routing]\nmodalities = 'MR'\n", "routing.modalities"),
        ("[ai]\ndevice = 'tpu'\n", "ai.device"),
        ("[ai]\nweights_dir = 'no/such/dir'\n", "ai.weights_dir"),
        ("[ai]\nmirror = 'yes'\n", "ai.mirror"),
        ("[logging]\nformat = 'xml'\n", "logging.format"),
        ("[tls]\nenabled = true\n", "tls.cert_file"),
        ("[[callers.allowed]]\nae_title='PACS'\naddress='somewhere'\n", "callers.allowed[0].address"),
        ("[[destinations]]\nname='pacs'\nae_title='PACS'\nport=104\n", "destinations[0].host"),
        ("[[destinations]]\nname='web'\ntype='stow'\n", "destinations[0].url"),
        (
            "[[destinations]]\nname='a'\nae_title='A'\nhost='127.0.0.1'\nport=1\n"
            "[[destinations]]\nname='a'\nae_title='B'\nhost='127.0.0.1'\nport=2\n",
            "destinations[1].name",
        ),
        ("[[destinations]]\nname='a'\nae_title='A'\nhost='h'\nport=1\nkinds=['pdf']\n", "destinations[0].kinds"),
    ],
)
def test_bad_value_is_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: "):
        load_config(write(tmp_path, text))


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[node\n"))


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_precedence_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nport = 11200\nae_title = 'FROMFILE'\n[series]\nquiet_seconds = 3.0\n")
    env = {
        "LUMBAR_NODE_NODE__PORT": "11300",
        "LUMBAR_NODE_ROUTING__MODALITIES": '["MR", "CT"]',
        "LUMBAR_NODE_NODE__AE_TITLE": "FROMENV",
        "LUMBAR_NODE_CONFIG": "ignored: no section separator",
        "UNRELATED": "x",
    }
    config = load_config(path, env=env, overrides={"node.port": 11400, "http.port": None})
    assert config.node.port == 11400  # override beats env beats file
    assert config.node.ae_title == "FROMENV"
    assert config.routing.modalities == ("MR", "CT")
    assert config.series.quiet_seconds == 3.0
    assert config.http.port == 11180  # None override = flag not given
    assert load_config(path, env=env).node.port == 11300


def test_environment_errors_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^node\.prot: unknown key"):
        load_config(None, env={"LUMBAR_NODE_NODE__PROT": "1"})
    with pytest.raises(ConfigError, match=r"^node\.port: expected an integer"):
        load_config(None, env={"LUMBAR_NODE_NODE__PORT": "abc"})


def test_unwritable_state_dir_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"^node\.state_dir: .*is not a directory"):
        load_config(None, overrides={"node.state_dir": str(blocker / "state")})
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        import os

        if os.geteuid() != 0:  # root may write anywhere; the not-a-directory case covers root
            with pytest.raises(ConfigError, match=r"^node\.state_dir: .*not writable"):
                load_config(None, overrides={"node.state_dir": str(read_only / "state")})
    finally:
        read_only.chmod(0o700)


def test_per_caller_quiet_period(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[series]\nquiet_seconds = 10.0\n[[callers.allowed]]\nae_title = 'SLOWPACS'\nquiet_seconds = 60.0\n"
        "[[callers.allowed]]\nae_title = 'SCANNER'\naddress = '10.0.0.7'\n",
    )
    config = load_config(path)
    assert config.quiet_seconds_for("SLOWPACS") == 60.0
    assert config.quiet_seconds_for("SCANNER") == 10.0
    assert config.quiet_seconds_for(None) == 10.0
    assert config.callers.allowed[1].address == "10.0.0.7"


def test_default_config_file_is_valid_and_documents_every_key() -> None:
    path = REPO / "config" / "node.toml"
    config = load_config(path)
    assert config.state_dir == (REPO / "state").resolve()
    text = path.read_text()
    sections = {f.name: f.type for f in dataclasses.fields(NodeConfig) if f.name not in ("source", "destinations")}
    for section in sections:
        assert f"[{section}]" in text
        for field in dataclasses.fields(getattr(config, section)):
            if field.name == "allowed":
                assert "[[callers.allowed]]" in text
                continue
            assert re.search(rf"^#? ?{field.name} = ", text, re.MULTILINE), f"{section}.{field.name} undocumented"
    for key in ("name", "type", "ae_title", "host", "port", "url", "kinds", "shadow", "overlay", "tls"):
        assert re.search(rf"^# {key} = ", text, re.MULTILINE), f"destinations.{key} undocumented"
    assert config.summary()["node"]["port"] == 11112


def test_precisions_match_the_inference_module() -> None:
    """The config validates ``[ai] precision`` without importing torch; its list must be
    the one :func:`ai.inference.autocast_dtype` accepts."""
    from ai.inference import PRECISIONS as INFERENCE_PRECISIONS
    from node.config import PRECISIONS

    assert PRECISIONS == INFERENCE_PRECISIONS
