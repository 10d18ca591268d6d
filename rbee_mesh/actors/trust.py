"""Who a node is and whom it trusts: its CURVE keypair, the keys it admits and in which role,
what each role may ask of each actor, and join tokens.

A node is a state directory: the queen, the hive and the keeper started by one user with one
`RBEE_MESH_HOME` are one node, with one keypair, and trust each other with no step at all (the
owner's key). Other nodes are trusted by role:

    owner    this node's own key, and peers in this process (no key): everything
    queen    a queen this hive joined or paired with: everything a hive serves
    hive     a hive this queen manages: its key is pinned; it may submit nothing
    keeper   a keeper of another machine that joined: the keepers' operations
    peer     another hive of the mesh, vouched for by a queen this hive trusts: it may read
             this hive's models (to fetch one from here), and nothing else
    joined   a queen this node joined as a keeper: pinned to talk to it; it may ask nothing
    invite   a join token's or pairing code's one-time key: `join` (queen) or `pair` (hive)

Files, under the state directory (0700; both 0600, replaced atomically):

    node.key     this node's secret key (z85), made on first start; never logged, never sent
    trust.json   the nodes it trusts: key, role, name, endpoint, when added

A join token (`queen invite`) carries the queen's public key and endpoints and the secret of a
fresh one-time keypair that the queen admits in the invite role until it is used or expires. A
pairing code (`hive pair`) stands for a one-time keypair derived from it and the hive's key,
which the hive admits the same way; the hive proves it knows the code too (`pairing_proof`).
docs/security.md tells the whole story.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import msgpack
from zmq.utils import z85

from rbee_mesh.files import write_atomic
from rbee_mesh.protocol import OPERATIONS, Actor, ErrorCode, MeshError, Operation
from rbee_mesh.transport import EndpointError
from rbee_mesh.transport.curve import ClientKeys, Keypair, ServerKeys, check_key, fingerprint
from rbee_mesh.transport.endpoints import parse_connect_endpoint

log = logging.getLogger("rbee_mesh.trust")

KEY_FILE = "node.key"
TRUST_FILE = "trust.json"
TOKEN_PREFIX = "rbee-join-"

#: Unknown keys whose refusal is remembered (each logged once); past this they are counted only.
MAX_REFUSED_KEYS = 1_024
#: Join tokens outstanding at once; past this the oldest is withdrawn.
MAX_INVITES = 64
#: How long a join token is good for unless `queen invite --ttl` says otherwise.
INVITE_TTL_S = 600.0
#: How often a lookup looks at the trust file for changes other processes made (revocations).
RELOAD_EVERY_S = 0.1


class Role(StrEnum):
    OWNER = "owner"
    QUEEN = "queen"
    HIVE = "hive"
    KEEPER = "keeper"
    INVITE = "invite"
    #: A queen this node joined as a keeper: its key pinned to talk to it, and nothing more.
    JOINED = "joined"
    #: A client of the queen's HTTP API, by the hash of its API key (never a socket's key).
    API = "api"
    #: Another hive of the mesh, as a queen this hive trusts named it (`peer_trust`).
    PEER = "peer"


#: Operations only the owner may submit to a queen: they change whom it trusts, or name a path
#: of this machine (which a hive of another machine must not be asked to read).
OWNER_ONLY = frozenset(
    {
        "invite", "hive_trust", "hive_untrust", "keeper_list", "keeper_revoke", "model_import",
        "apikey_create", "apikey_list", "apikey_revoke",
    }
)  # fmt: skip
#: How an API key begins (what `rbee-mesh apikey create` prints).
API_KEY_PREFIX = "rbee-sk-"
#: What a node may send with a one-time key: a join token's to a queen, a pairing code's to a hive.
REDEEMING = frozenset({"join", "pair"})
#: What a hive serves to its queens and peers alone: a queen runs them on no one's behalf.
HIVE_TO_HIVE = frozenset({"model_read", "peer_trust", "peer_untrust"})
#: What a peer (another hive of the mesh) may ask of a hive: its models, to fetch one.
PEERS = frozenset({"model_read", "model_get"})

ALL: frozenset[str] | None = None
"""In a policy: every operation the actor serves."""


def _policy(actor: Actor) -> Mapping[Role, frozenset[str] | None]:
    """What each role may submit to `actor`. A role not named may submit nothing, and is not
    even admitted at the handshake of the actor's sockets."""
    if actor is Actor.QUEEN:
        keepers = frozenset(OPERATIONS) - OWNER_ONLY - REDEEMING - HIVE_TO_HIVE - {"hive_pair"}
        return {Role.OWNER: ALL, Role.KEEPER: keepers, Role.INVITE: frozenset({"join"})}
    if actor is Actor.HIVE:
        queens = frozenset(OPERATIONS) - REDEEMING - {"hive_pair", "model_import"}
        return {
            Role.OWNER: ALL, Role.QUEEN: queens, Role.INVITE: frozenset({"pair"}),
            Role.PEER: PEERS,
        }  # fmt: skip
    return {Role.OWNER: ALL}  # a worker: its hive, whose key it holds


@dataclass(frozen=True)
class Trusted:
    """A node this one trusts."""

    key: str
    role: Role
    name: str
    endpoint: str = ""
    added: float = field(default_factory=time.time)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name, "role": str(self.role), "fingerprint": self.fingerprint,
            "endpoint": self.endpoint, "added": self.added,
        }  # fmt: skip


@dataclass(frozen=True)
class Invite:
    """An outstanding join token's one-time key."""

    keypair: Keypair
    role: Role
    expires: float
    #: Redeemed: no new handshake with it. The connection that redeemed it still speaks in its
    #: role until it expires (to hear the answer), and cannot redeem it again.
    used: bool = False


class Trust:
    """This node's keypair and the keys it trusts; also the CURVE admission of its sockets.

    `admits` runs on the ZAP thread and `role_of` on the actor's: the table they read is
    replaced whole on every change, never changed in place. Several processes of one state
    directory share the trust file (a queen daemon, a hive daemon, the command that joins a
    queen): a change is made under a lock on the file, to what it holds then; and a key not
    in the table sends a look at the file first, in case another process trusted it since.
    """

    def __init__(self, keypair: Keypair, path: Path | None = None) -> None:
        """`path`: the trust file to keep the table in (None: in memory only)."""
        self.keypair = keypair
        self.path = path
        self._trusted: dict[str, Trusted] = {}
        self._invites: dict[str, Invite] = {}
        self._lock = threading.Lock()
        #: Handshakes refused, in all; and the unknown keys refused (each logged once).
        self.refusals = 0
        self._refused: dict[str, int] = {}
        self._read_at: tuple[int, int] | None = None
        self._looked = time.monotonic()
        self._reload()  # a malformed file is an error here, at start

    @classmethod
    def load(cls, state_dir: Path) -> Trust:
        """The node of `state_dir`: its keypair (made on first start) and its trust file."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(_load_keypair(state_dir / KEY_FILE), state_dir / TRUST_FILE)

    @classmethod
    def for_process(cls) -> Trust:
        """A node of this process alone, with a key of its own that no file holds: what actors
        started without a state directory's trust use (tests, benchmarks). They trust each
        other, as the actors of one state directory do."""
        global _process_trust
        if _process_trust is None:
            _process_trust = cls(Keypair.generate())
        return _process_trust

    # ---- asking ---------------------------------------------------------------------------------

    @property
    def public(self) -> str:
        return self.keypair.public

    def role_of(self, key: str) -> Role | None:
        """The role of the peer with `key` ("" : a peer in this process), or None: not trusted."""
        if not key or key == self.keypair.public:
            return Role.OWNER
        now = time.monotonic()
        trusted = self._trusted.get(key)
        if trusted is None or now - self._looked >= RELOAD_EVERY_S:  # changed elsewhere?
            self._looked = now
            if self._reload_quietly():
                trusted = self._trusted.get(key)
        if trusted is not None:
            return trusted.role
        invite = self._invites.get(key)
        if invite is not None and time.time() < invite.expires:
            return Role.INVITE
        return None

    def admits(self, key: str, roles: Collection[Role] = frozenset(Role)) -> bool:
        """The ZAP handler's question (on its thread): admit this key, in one of `roles`, at
        the handshake? Never raises: an exception would end pyzmq's ZAP thread, and with it
        every handshake of this process."""
        try:
            invite = self._invites.get(key)
            if (invite is None or not invite.used) and self.role_of(key) in roles:
                return True
        except Exception:
            log.exception("could not judge a peer's key; refusing it")
        with self._lock:
            self.refusals += 1
            seen = self._refused.get(key)
            if seen is None and len(self._refused) < MAX_REFUSED_KEYS:
                self._refused[key] = 1
                log.warning(
                    "refused a peer whose key is not trusted here: %s", _safe_fingerprint(key)
                )
            elif seen is not None:
                self._refused[key] = seen + 1
        return False

    def permits(self, actor: Actor, role: Role, op: Operation) -> bool:
        """May a peer of `role` submit `op` to `actor`?"""
        allowed = _POLICIES[actor].get(role, frozenset())
        return allowed is None or op.NAME in allowed

    def entries(self, role: Role | None = None) -> list[Trusted]:
        return [t for t in self._trusted.values() if role is None or t.role is role]

    def find(self, who: str, role: Role) -> Trusted:
        """The trusted node of `role` named `who` (its name, fingerprint or key); NOT_FOUND."""
        for t in self.entries(role):
            if who in (t.name, t.key, t.fingerprint):
                return t
        raise MeshError(ErrorCode.NOT_FOUND, f"no trusted {role} {who!r}")

    def pinned(self, endpoint: str) -> str | None:
        """The key pinned for a server at `endpoint`, if a trusted node lives there."""
        for t in self._trusted.values():
            if t.endpoint == endpoint and t.role in (Role.QUEEN, Role.HIVE, Role.JOINED):
                return t.key
        return None

    def api_client(self, api_key: str) -> Trusted | None:
        """The API client whose key `api_key` is (an `Authorization: Bearer` token), if any."""
        digest = _api_key_hash(api_key)
        if self.role_of(digest) is not Role.API:  # the file looked at as for any key
            return None
        return self._trusted.get(digest)

    # ---- keys for sockets ---------------------------------------------------------------------

    def server_keys(self, actor: Actor | None = None) -> ServerKeys:
        """What a listener of `actor` is made with: it admits at the handshake only the keys
        of roles that may ask `actor` something (None: every trusted key)."""
        roles = frozenset(Role) if actor is None else admitted(actor)
        return ServerKeys(self.keypair, _Admission(self, roles))

    def heartbeat_keys(self) -> ServerKeys:
        """What a hive's heartbeat publisher is made with: its queens (and its node) only."""
        return ServerKeys(self.keypair, _Admission(self, frozenset({Role.OWNER, Role.QUEEN})))

    def client_keys(self, server_key: str = "") -> ClientKeys:
        """What this node's connections are made with (a subscriber's: no server key yet)."""
        return ClientKeys(self.keypair, server_key or self.keypair.public)

    # ---- changing ------------------------------------------------------------------------------

    def trust(self, key: str, role: Role, name: str, endpoint: str = "") -> Trusted:
        """Trust `key` in `role` as `name`; it replaces what was trusted under that name and
        role (a node that made a new key) or with that key."""
        check_key(key)
        entry = Trusted(key=key, role=role, name=name, endpoint=endpoint)
        with self._changing() as table:
            for k, t in list(table.items()):
                if t.name == name and t.role is role:
                    del table[k]
            table[key] = entry
        log.info("trusting %s %s (%s)", role, name, entry.fingerprint)
        return entry

    def new_api_key(self, name: str) -> tuple[str, Trusted]:
        """A new API key for `name` (replacing its earlier one): the key itself, shown once,
        and its entry, which holds only the key's hash."""
        api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        return api_key, self.trust(_api_key_hash(api_key), Role.API, name)

    def untrust(self, entry: Trusted) -> None:
        with self._changing() as table:
            table.pop(entry.key, None)
        log.info("no longer trusting %s %s (%s)", entry.role, entry.name, entry.fingerprint)

    def invite(
        self, role: Role, ttl_s: float = INVITE_TTL_S, keypair: Keypair | None = None
    ) -> Invite:
        """A one-time key (fresh, or `keypair`: a pairing code's), admitted in the invite role
        for `ttl_s`, for a node of `role` (in memory only: a restart withdraws it)."""
        now = time.time()
        live = {k: i for k, i in self._invites.items() if i.expires > now}
        while len(live) >= MAX_INVITES:
            del live[next(iter(live))]
        invite = Invite(keypair or Keypair.generate(), role, now + ttl_s)
        live[invite.keypair.public] = invite
        self._invites = live
        return invite

    def invitation(self, key: str) -> Invite:
        """The invite of `key`, still good and not used (CONFLICT otherwise), not used up."""
        invite = self._invites.get(key)
        if invite is None or invite.used or time.time() >= invite.expires:
            raise MeshError(ErrorCode.CONFLICT, "this join token was used already or expired")
        return invite

    def redeem(self, key: str) -> Invite:
        """Use up the invite of `key`: it admits nobody from now on."""
        invite = self.invitation(key)
        self._invites = {**self._invites, key: replace(invite, used=True)}
        return invite

    @contextmanager
    def _changing(self) -> Iterator[dict[str, Trusted]]:
        """A copy of the table to change, as the file holds it now; written back after."""
        if self.path is None:
            table = dict(self._trusted)
            yield table
            self._trusted = table
            return
        lock = os.open(self.path.with_name(TRUST_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            table = {t.key: t for t in _read_trust(self.path)}
            yield table
            rows = [{**asdict(t), "role": str(t.role)} for t in table.values()]
            write_atomic(self.path, json.dumps(rows, indent=1).encode())
            with self._lock:  # never an older table read by the ZAP thread after this one
                self._trusted = table
                self._read_at = _stamp(self.path)
        finally:
            os.close(lock)

    def _reload_quietly(self) -> bool:
        """`_reload`, keeping the table it has if the file cannot be read (said once)."""
        try:
            return self._reload()
        except Exception as exc:
            with contextlib.suppress(OSError):
                self._read_at = _stamp(self.path) if self.path is not None else None
            why = exc.message if isinstance(exc, MeshError) else f"{self.path}: {exc}"
            log.error("%s; trusting what it held before", why)
            return False

    def _reload(self) -> bool:
        """Read the trust file again if it changed since last read; whether it had."""
        if self.path is None:
            return False
        with self._lock:
            stamp = _stamp(self.path)
            if stamp == self._read_at:
                return False
            self._trusted = {t.key: t for t in _read_trust(self.path)}
            self._read_at = stamp
            return True


@dataclass(frozen=True)
class _Admission:
    """A server socket's admission: the keys of `roles` that its node trusts now."""

    trust: Trust
    roles: frozenset[Role]

    def admits(self, key: str) -> bool:
        return self.trust.admits(key, self.roles)


def admitted(actor: Actor) -> frozenset[Role]:
    """The roles whose keys `actor`'s listener admits: those that may ask it something."""
    return frozenset(_POLICIES[actor])


def _api_key_hash(api_key: str) -> str:
    """What the trust table holds for an API key: its sha256, in z85 like a node's key (a key
    of 256 random bits needs no slow hash; nothing can be made to handshake with it)."""
    digest = hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).digest()
    return z85.encode(digest).decode("ascii")


def _safe_fingerprint(key: str) -> str:
    try:
        return fingerprint(key)
    except Exception:
        return "(not a key)"


_process_trust: Trust | None = None
_POLICIES = {actor: _policy(actor) for actor in (Actor.QUEEN, Actor.HIVE, Actor.WORKER)}


def _make_keypair(path: Path) -> Keypair | None:
    """Make this node's key at `path` (0600), unless another process made it first (None):
    written whole to a file of its own, then linked into place, which fails if one is there."""
    keypair = Keypair.generate()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(keypair.secret + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.link(tmp, path)
    except FileExistsError:
        return None
    finally:
        os.unlink(tmp)
    log.info("made this node's key in %s (%s)", path, keypair.fingerprint)
    return keypair


def _stamp(path: Path) -> tuple[int, int] | None:
    """What changes when the file is replaced: its inode and modification time."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _load_keypair(path: Path) -> Keypair:
    """The keypair whose secret `path` holds; made (0600) if there is no file yet."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        made = _make_keypair(path)
        if made is not None:
            return made
        text = path.read_text().strip()  # another process of this node made it first
    except OSError as exc:
        why = f"cannot read this node's key {path}: {exc}"
        raise MeshError(ErrorCode.UNAVAILABLE, why) from None
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise MeshError(
            ErrorCode.UNAVAILABLE,
            f"{path} can be read by others (mode {mode:o}); chmod 600 it, or remove it to "
            "make a new key (nodes that trust this one must then trust it again)",
        )
    try:
        return Keypair.from_secret(text)
    except ValueError:
        raise MeshError(ErrorCode.UNAVAILABLE, f"{path} does not hold a key") from None


def _read_trust(path: Path) -> Iterable[Trusted]:
    try:
        rows = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise MeshError(ErrorCode.UNAVAILABLE, f"cannot read {path}: {exc}") from None
    try:
        return [_trusted(row) for row in rows]
    except (TypeError, KeyError, ValueError) as exc:
        raise MeshError(ErrorCode.UNAVAILABLE, f"{path} is malformed: {exc}") from None


def _trusted(row: dict[str, Any]) -> Trusted:
    return Trusted(
        key=check_key(row["key"]),
        role=Role(row["role"]),
        name=str(row["name"]),
        endpoint=str(row.get("endpoint", "")),
        added=float(row.get("added", 0)),
    )


# ---- pairing codes -------------------------------------------------------------------------------

#: The letters of a pairing code: no 0/O, 1/I/L, U (read aloud, copied by hand).
_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"


def new_pairing_code() -> str:
    """Ten letters (49 bits) in two groups of five, as `KX7RT-M4PQA`: what `hive pair` prints.
    Guessing it means one CURVE handshake per guess, each refused and counted, for as long as
    it is good."""
    letters = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(10))
    return f"{letters[:5]}-{letters[5:]}"


def pairing_keypair(code: str, hive_key: str) -> Keypair:
    """The one-time keypair a pairing code stands for, at the hive of `hive_key`: both sides
    derive it (the hive when it opens the window, the queen from the code a person typed)."""
    normal = code.replace("-", "").upper()
    seed = hashlib.sha256(b"rbee-mesh pairing\0" + normal.encode() + b"\0" + hive_key.encode())
    return Keypair.from_secret(z85.encode(seed.digest()).decode("ascii"))


def _tcp(endpoint: object) -> str:
    """A token's endpoint: tcp, naming a host and port (ValueError otherwise)."""
    try:
        parsed = parse_connect_endpoint(str(endpoint))
    except EndpointError as exc:
        raise ValueError(str(exc)) from None
    if parsed.scheme != "tcp":
        raise ValueError(f"{endpoint}: a queen is joined over tcp")
    return str(parsed)


def pairing_proof(code_keypair: Keypair, queen_key: str, hive_key: str) -> str:
    """What a hive answers `pair` with, proving it knows the code too (an impostor announcing a
    hive's name with its own key can complete the handshake, not this): an HMAC, keyed by the
    code's secret, of both public keys."""
    message = f"{queen_key}\0{hive_key}".encode()
    return hmac.new(code_keypair.secret.encode(), message, hashlib.sha256).hexdigest()


# ---- join tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinToken:
    """What `queen invite` prints and `--join` takes: one line, good once, until `expires`."""

    queen_key: str
    endpoints: tuple[str, ...]
    invite: Keypair
    role: Role
    expires: float

    def encode(self) -> str:
        body = [self.queen_key, list(self.endpoints), self.invite.secret, str(self.role),
                round(self.expires)]  # fmt: skip
        packed = msgpack.packb(body)
        return TOKEN_PREFIX + base64.urlsafe_b64encode(packed).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        """Parse a token; INVALID_REQUEST saying what is wrong with it."""
        bad = MeshError(ErrorCode.INVALID_REQUEST, "this is not a join token (rbee-join-...)")
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX) or len(text) > 2_000:
            raise bad
        body = text[len(TOKEN_PREFIX) :]
        try:
            packed = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            queen_key, endpoints, secret, role, expires = msgpack.unpackb(packed)
            token = cls(
                queen_key=check_key(queen_key),
                endpoints=tuple(_tcp(e) for e in endpoints),
                invite=Keypair.from_secret(secret),
                role=Role(role),
                expires=float(expires),
            )
        except (binascii.Error, ValueError, TypeError, msgpack.UnpackException):
            raise bad from None
        if token.role not in (Role.HIVE, Role.KEEPER):
            raise bad
        if time.time() >= token.expires:
            raise MeshError(ErrorCode.CONFLICT, "this join token has expired; ask for a new one")
        return token
