"""The config file and peer addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbee_mesh.actors.queen.config import Config, load_config, peer_endpoint, peer_spec
from rbee_mesh.protocol import MeshError


@pytest.mark.parametrize(
    ("peer", "endpoint"),
    [
        ("10.0.0.7", "tcp://10.0.0.7:7835"),
        ("gpu-box:7900", "tcp://gpu-box:7900"),
        ("tcp://gpu-box:7835", "tcp://gpu-box:7835"),
        ("[fd00::7]:7835", "tcp://[fd00::7]:7835"),
    ],
)
def test_a_peer_is_host_host_port_or_an_endpoint(peer: str, endpoint: str) -> None:
    assert peer_endpoint(peer) == endpoint


@pytest.mark.parametrize("peer", ["box:0", "box:99999", "box:http", ":7835"])
def test_a_malformed_peer_is_refused_naming_it(peer: str) -> None:
    with pytest.raises(MeshError) as err:
        peer_endpoint(peer)
    assert repr(peer) in err.value.message


def test_no_config_file_is_an_empty_config(tmp_path: Path) -> None:
    assert load_config(tmp_path) == Config()


KEY = "9?@gr!a]vwRHx(ETfD.?@Ya(RBnS@Eh*OPzrBpRZ"


def test_peers_are_read_from_the_queen_section_with_their_keys(tmp_path: Path) -> None:
    peers = f'["10.0.0.7", "b:7900#{KEY}"]'
    (tmp_path / "config.toml").write_text(f"[queen]\npeers = {peers}\n")
    assert load_config(tmp_path).peers == (("tcp://10.0.0.7:7835", ""), ("tcp://b:7900", KEY))


def test_a_peer_whose_key_is_not_a_key_is_refused_naming_it() -> None:
    peer = "b:7900#" + "x" * 39 + "~"
    with pytest.raises(MeshError) as err:
        peer_spec(peer)
    assert repr(peer) in err.value.message and "not a public key" in err.value.message


@pytest.mark.parametrize(
    ("text", "words"),
    [("[queen\n", "cannot read"), ('[queen]\npeers = "x"\n', "must be a list of strings")],
)
def test_a_malformed_config_is_a_clear_error(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(MeshError) as err:
        load_config(tmp_path)
    assert words in err.value.message and "config.toml" in err.value.message
