"""The optional config file: `<state>/config.toml`.

    [queen]
    # Hives to manage without discovery (networks without multicast): HOST, HOST:PORT or an
    # endpoint (tcp://HOST:PORT), then `#` and the hive's public key (`rbee-mesh id` on that
    # box prints it; without one, the key of this state directory: a hive of this machine).
    # The port defaults to the hive's, 7835.
    peers = ["10.0.0.7#9?@gr!a]vwRHx(ETfD.?@Ya(RBnS@Eh*OPzrBpRZ", "gpu-box:7835#..."]

A missing file is an empty config; a malformed one is a clear error naming the file and the
problem, never a traceback.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from rbee_mesh.protocol import ErrorCode, MeshError
from rbee_mesh.protocol.constants import HIVE_PORT
from rbee_mesh.transport.curve import KEY_CHARS, check_key

CONFIG_NAME = "config.toml"


@dataclass(frozen=True)
class Config:
    #: (endpoint, key) of each peer; key "" for a hive of this state directory.
    peers: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def load_config(state_dir: Path) -> Config:
    path = state_dir / CONFIG_NAME
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MeshError(ErrorCode.INVALID_REQUEST, f"cannot read {path}: {exc}") from None
    queen = data.get("queen", {})
    peers = queen.get("peers", []) if isinstance(queen, dict) else None
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
        raise MeshError(
            ErrorCode.INVALID_REQUEST, f"{path}: [queen] peers must be a list of strings"
        )
    return Config(peers=tuple(peer_spec(p) for p in peers))


def peer_spec(peer: str) -> tuple[str, str]:
    """`WHERE` or `WHERE#KEY` as (endpoint, key): WHERE as `peer_endpoint` takes it, KEY the
    hive's public key ("" if not given)."""
    if len(peer) <= KEY_CHARS + 1 or peer[-KEY_CHARS - 1] != "#":
        return peer_endpoint(peer), ""
    where, key = peer[: -KEY_CHARS - 1], peer[-KEY_CHARS:]
    try:
        return peer_endpoint(where), check_key(key)
    except ValueError:
        raise MeshError(
            ErrorCode.INVALID_REQUEST, f"{peer!r}: what follows # is not a public key"
        ) from None


def peer_endpoint(peer: str) -> str:
    """`HOST`, `HOST:PORT` or `tcp://HOST:PORT` as an endpoint (the hive's port by default).
    An IPv6 host is written in brackets with its port, `[::1]:7835`."""
    if "://" in peer:
        return peer
    host, sep, port = peer.rpartition(":")
    if not sep:
        host, port = peer, str(HIVE_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeshError(
            ErrorCode.INVALID_REQUEST, f"{peer!r} is not HOST, HOST:PORT or an endpoint"
        )
    return f"tcp://{host}:{port}"
