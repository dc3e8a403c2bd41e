"""CURVE keys and the allow-list: who may speak to a smrd process over ZeroMQ.

Owns: the key-file format (NAME.key holds a secret key, NAME.pub a public key; each is one line
of Z85 text, 40 characters, exactly what zmq.curve_keypair() returns), `smrd keygen`, loading
and checking keys at start, re-reading the allow-list directory when it changes (so keys can be
added and removed without restarts), and the ZAP decision (RFC 27): is this client key allowed
on this kind of port.
Never: opens or binds a network socket (transport owns those and hands us sockets to configure
and ZAP requests to judge), writes a secret key anywhere but a new mode-0600 file, logs or
prints a secret key, or lets a key through that the allow-list does not name (an allow-list
that fails to re-read keeps the last good one in force).

How a process learns each replica's public key: a DEALER must know its server's public key
before it connects, so the allow-list directory holds `replica-<id>.pub` for every replica in
hosts.conf, and that file *is* replica <id>'s identity. Keys under other names (gateway-0.pub,
ops.pub, ...) belong to processes that only talk to replicas' client ports; only `replica-*`
keys are accepted on a peer port, so a gateway's key cannot speak consensus.
"""
import os
import re
import stat
from dataclasses import dataclass

import zmq

from ..errors import ConfigError, SmrdError

KEY_CHARS = 40  # Z85 text of a 32-byte Curve25519 key
MAX_KEY_FILE = 4096
SECRET_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"
REPLICA_PREFIX = "replica-"
# ZAP domains tell the handler which port a handshake arrived on.
PEER_DOMAIN = b"smrd-peer"
CLIENT_DOMAIN = b"smrd-client"
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
KEYGEN_HINT = "generate a key pair with: smrd keygen --out DIR --name NAME (see docs/security.md)"

Z85_ALPHABET = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_INDEX = {c: i for i, c in enumerate(Z85_ALPHABET)}


class KeyFileError(ValueError):
    """A key file or allow-list directory that cannot be used; the message says why."""


def replica_key_name(replica_id: int) -> str:
    return f"{REPLICA_PREFIX}{replica_id}"


# --- Z85 and key files ------------------------------------------------------------------------

def z85_decode(text: bytes) -> bytes:
    """Raw bytes of Z85 text (length a multiple of 5); KeyFileError on anything else."""
    if len(text) % 5:
        raise KeyFileError(f"Z85 text must be a multiple of 5 characters long, got {len(text)}")
    out = bytearray()
    for i in range(0, len(text), 5):
        value = 0
        for c in text[i:i + 5]:
            digit = _Z85_INDEX.get(c)
            if digit is None:
                raise KeyFileError(f"character {chr(c)!r} is not in the Z85 alphabet")
            value = value * 85 + digit
        if value >> 32:
            raise KeyFileError(f"{text[i:i + 5].decode()!r} is not valid Z85 (the group overflows 32 bits)")
        out += value.to_bytes(4, "big")
    return bytes(out)


def z85_encode(raw: bytes) -> bytes:
    """Z85 text of raw bytes (length a multiple of 4): how keys are shown in logs."""
    out = bytearray()
    for i in range(0, len(raw), 4):
        value = int.from_bytes(raw[i:i + 4], "big")
        group = bytearray(5)
        for j in range(4, -1, -1):
            value, digit = divmod(value, 85)
            group[j] = Z85_ALPHABET[digit]
        out += group
    return bytes(out)


def parse_key(data: bytes) -> bytes:
    """The Z85 key in a key file's bytes. Blank lines and '#' comment lines are ignored, so a
    file may carry a note; exactly one key line must remain."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError("not a key file: it is not ASCII text; a key file holds one line of "
                           f"{KEY_CHARS} Z85 characters, as smrd keygen writes") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if len(lines) != 1:
        raise KeyFileError(f"expected one line holding a {KEY_CHARS}-character Z85 key, found "
                           f"{len(lines)} non-comment lines")
    key = lines[0].encode()
    if len(key) != KEY_CHARS:
        raise KeyFileError(f"the key is {len(key)} characters long; a Z85 CURVE key has {KEY_CHARS}")
    z85_decode(key)
    return key


def read_key(path: str) -> bytes:
    """The Z85 key in the file at path; KeyFileError (naming no path: the caller does) if not."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise KeyFileError("no such file") from None
    except IsADirectoryError:
        raise KeyFileError("is a directory, not a key file") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read it ({exc.strerror}); check the path and permissions") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"over {MAX_KEY_FILE} bytes: not a key file")
    return parse_key(data)


def public_key(secret: bytes) -> bytes:
    """The Z85 public key of a Z85 secret key."""
    return zmq.curve_public(secret)


def _pub_entries(directory: str):
    """(name, path) of every NAME.pub in directory, sorted. Dot-names are skipped: Kubernetes
    mounts a Secret as ..data/ and ..<timestamp>/ beside symlinks to the current files."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        raise KeyFileError("no such directory") from None
    except NotADirectoryError:
        raise KeyFileError("is a file, not a directory (give the directory that holds the *.pub files)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot list it ({exc.strerror}); check the path and permissions") from None
    return [(n[:-len(PUBLIC_SUFFIX)], os.path.join(directory, n)) for n in names
            if n.endswith(PUBLIC_SUFFIX) and not n.startswith(".") and len(n) > len(PUBLIC_SUFFIX)]


def read_allow_list(directory: str) -> dict[str, bytes]:
    """{name: Z85 public key} of every NAME.pub in directory; KeyFileError names a bad file."""
    keys = {}
    for name, path in _pub_entries(directory):
        if os.path.isdir(path):
            continue
        try:
            keys[name] = read_key(path)
        except KeyFileError as exc:
            raise KeyFileError(f"{path}: {exc}; fix or remove that file") from None
    if not keys:
        raise KeyFileError("holds no *.pub files; put there the public key of every replica "
                           "(replica-<id>.pub) and of every gateway or tool that may connect")
    return keys


def _listing(directory: str):
    """What changes when any NAME.pub is added, removed or rewritten (a cheap stat per file)."""
    out = []
    for name, path in _pub_entries(directory):
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


# --- one process's keys -----------------------------------------------------------------------

class Security:
    """This process's key pair and the allow-list, as validated at start by load()."""

    def __init__(self, secret: bytes, directory: str, allowed: dict[str, bytes], secret_path: str = ""):
        self.secret = secret
        self.public = public_key(secret)
        self.secret_path = secret_path
        self.directory = directory
        self.allowed: dict[str, bytes] = {}
        self._by_raw: dict[bytes, str] = {}
        self._set_allowed(allowed)
        try:
            self._listing = _listing(directory)
        except KeyFileError:
            self._listing = None

    def __repr__(self) -> str:  # never the secret
        return f"Security(public={self.public.decode()}, allow_list={self.directory!r}, keys={len(self.allowed)})"

    def _set_allowed(self, allowed: dict[str, bytes]) -> None:
        self.allowed = dict(allowed)
        # One key under two names: the replica name wins (it is allowed on more ports).
        ordered = sorted(allowed.items(), key=lambda item: (item[0].startswith(REPLICA_PREFIX), item[0]))
        self._by_raw = {z85_decode(key): name for name, key in ordered}

    def server_key(self, replica_id: int) -> bytes:
        """Replica replica_id's public key: what a DEALER towards it must expect."""
        key = self.allowed.get(replica_key_name(replica_id))
        if key is None:
            raise KeyFileError(f"{self.directory} has no {replica_key_name(replica_id)}{PUBLIC_SUFFIX}")
        return key

    def configure_server(self, sock, domain: bytes) -> None:
        """Make a bound socket a CURVE server that asks ZAP (under `domain`) about each client."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain)

    def configure_client(self, sock, replica_id: int) -> bytes:
        """Make a socket a CURVE client of replica replica_id; returns the server key it expects."""
        server = self.server_key(replica_id)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        return server

    def judge(self, domain: bytes, raw_key: bytes) -> tuple[bool, str | None]:
        """(allowed, name of the key or None) for a client key on a port of `domain`."""
        name = self._by_raw.get(raw_key)
        if name is None:
            return False, None
        if domain == PEER_DOMAIN and not name.startswith(REPLICA_PREFIX):
            return False, name
        return domain in (PEER_DOMAIN, CLIENT_DOMAIN), name

    def reload(self):
        """Re-read the allow-list if a *.pub file changed. None if nothing changed, else
        (added, removed, changed) names. KeyFileError if it no longer reads: the previous
        allow-list stays in force, and the same broken state is not reported twice."""
        try:
            listing = _listing(self.directory)
        except KeyFileError as exc:
            if self._listing is None:
                return None
            self._listing = None
            raise KeyFileError(f"{self.directory}: {exc}") from None
        if listing == self._listing:
            return None
        self._listing = listing
        try:
            allowed = read_allow_list(self.directory)
        except KeyFileError as exc:
            msg = str(exc)
            raise KeyFileError(msg if msg.startswith(self.directory) else f"{self.directory}: {msg}") from None
        old = self.allowed
        added = sorted(set(allowed) - set(old))
        removed = sorted(set(old) - set(allowed))
        changed = sorted(n for n in set(old) & set(allowed) if old[n] != allowed[n])
        self._set_allowed(allowed)
        return added, removed, changed


@dataclass(frozen=True)
class Refusal:
    """A handshake ZAP said no to: what to log."""

    domain: bytes
    address: str
    key: str        # the client's public key, Z85
    name: str | None  # its allow-list name, when it is listed but not for this port


def zap_answer(security: Security, frames: list[bytes]) -> tuple[list[bytes] | None, Refusal | None]:
    """The reply to one ZAP request (RFC 27) as received on a ROUTER, and the refusal, if any.

    Request: [routing id, b"", version, request id, domain, address, identity, mechanism, *credentials].
    """
    if len(frames) < 8 or frames[1] != b"":
        return None, None  # not a ZAP request; nothing sensible to answer
    route, _, version, request_id, domain, address, _identity, mechanism, *credentials = frames

    def reply(code: bytes, text: bytes, user: bytes = b"") -> list[bytes]:
        return [route, b"", b"1.0", request_id, code, text, user, b""]

    addr = address.decode("ascii", "replace")
    if version != b"1.0":
        return reply(b"500", b"unsupported ZAP version"), None
    if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
        return reply(b"400", b"CURVE required"), Refusal(domain, addr, "(no CURVE key)", None)
    ok, name = security.judge(domain, credentials[0])
    if ok:
        return reply(b"200", b"OK", name.encode()), None
    return reply(b"400", b"key not allowed"), Refusal(domain, addr, z85_encode(credentials[0]).decode(), name)


# --- validation at start (called by smrd.config.settings) ----------------------------------------------

def load(secret_path: str, secret_where: str, directory: str, directory_where: str, hosts,
         replica_id: int | None) -> tuple[Security, tuple[str, ...]]:
    """Load and check this process's keys; ConfigError (one line, naming the setting's source and
    the fix) on anything that would make the cluster refuse us or us refuse it.

    secret_where / directory_where: "curve_secret_key=PATH (flag --curve-secret-key)" and the like.
    replica_id: this replica's id (role server), else None.
    """
    warnings = []
    if secret_path.endswith(PUBLIC_SUFFIX):
        raise ConfigError(f"{secret_where}: names a public key file ({PUBLIC_SUFFIX}); give this process's "
                          f"secret key file (NAME{SECRET_SUFFIX}, mode 0600)")
    try:
        secret = read_key(secret_path)
    except KeyFileError as exc:
        raise ConfigError(f"{secret_where}: {exc}; {KEYGEN_HINT}") from None
    try:
        mode = os.stat(secret_path).st_mode
    except OSError:
        mode = 0
    if stat.S_IMODE(mode) & 0o007:
        warnings.append(f"{secret_where}: the secret key is readable by every user (mode "
                        f"{stat.S_IMODE(mode):04o}); chmod 600 it (in Kubernetes: defaultMode: 0400)")
    try:
        allowed = read_allow_list(directory)
    except KeyFileError as exc:
        raise ConfigError(f"{directory_where}: {exc}") from None
    for name, key in allowed.items():
        if key == secret:
            raise ConfigError(f"{secret_where}: this is the public key {name}{PUBLIC_SUFFIX} of {directory}, "
                              f"not a secret key; give the matching {name}{SECRET_SUFFIX}")
    missing = [replica_key_name(r) + PUBLIC_SUFFIX for r in hosts.replicas
               if replica_key_name(r) not in allowed]
    if missing:
        raise ConfigError(
            f"{directory_where}: lacks {', '.join(missing)}: a process learns each replica's public key "
            f"from replica-<id>.pub (ids from {hosts.path}) and cannot connect to a replica without it; "
            f"copy those files there")
    security = Security(secret, directory, allowed, secret_path)
    mine = security.public.decode()
    if replica_id is not None:
        listed = allowed[replica_key_name(replica_id)]
        if listed != security.public:
            raise ConfigError(
                f"{secret_where}: does not belong to replica {replica_id}: its public key is {mine}, but "
                f"{os.path.join(directory, replica_key_name(replica_id) + PUBLIC_SUFFIX)} holds "
                f"{listed.decode()}; peers and gateways would fail the handshake with this replica; "
                f"use replica {replica_id}'s own key pair")
    if security.public not in allowed.values():
        stem = os.path.basename(secret_path)
        stem = stem[:-len(SECRET_SUFFIX)] if stem.endswith(SECRET_SUFFIX) else None
        if stem in allowed:
            # Listed under another name is fine (a rotated key kept at a stable path); a NAME.pub
            # beside a NAME.key that is not its pair is a mix-up.
            raise ConfigError(
                f"{secret_where}: its public key {mine} differs from {stem}{PUBLIC_SUFFIX} in {directory} "
                f"({allowed[stem].decode()}) and is listed under no other name; the two files are not one "
                f"key pair; copy the matching .pub there (or regenerate both)")
        warnings.append(f"this process's public key {mine} is not in the allow-list {directory}: replicas "
                        f"that share this allow-list will refuse it; add its .pub file there")
    return security, tuple(warnings)


# --- smrd keygen ------------------------------------------------------------------------------

def check_key_name(name: str) -> None:
    if not KEY_NAME.fullmatch(name) or name.endswith((SECRET_SUFFIX, PUBLIC_SUFFIX)):
        raise ConfigError(f"key name {name!r}: use letters, digits, '.', '_' and '-' (up to 100, "
                          f"not starting with '.', without {SECRET_SUFFIX}/{PUBLIC_SUFFIX}), e.g. replica-0")


def keygen(out_dir: str, name: str) -> tuple[str, str, bytes]:
    """Write out_dir/NAME.key (secret, mode 0600) and out_dir/NAME.pub; never overwrite.
    Returns (key path, pub path, public key)."""
    check_key_name(name)
    key_path = os.path.join(out_dir, name + SECRET_SUFFIX)
    pub_path = os.path.join(out_dir, name + PUBLIC_SUFFIX)
    for path in (key_path, pub_path):
        if os.path.lexists(path):
            raise SmrdError(f"refusing to overwrite {path}; remove it first or pick another --name")
    public, secret = zmq.curve_keypair()
    # O_EXCL: a file that appeared since the check above is still never overwritten.
    _write_new(key_path, secret, 0o600)
    try:
        _write_new(pub_path, public, 0o644)
    except BaseException:
        os.unlink(key_path)  # half a key pair is worse than none
        raise
    return key_path, pub_path, public


def _write_new(path: str, key: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise SmrdError(f"refusing to overwrite {path}; remove it first or pick another --name") from None
    except OSError as exc:
        raise SmrdError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        os.write(fd, key + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def main(args) -> int:
    """smrd keygen --out DIR [--name NAME ...] (or --kube-secret: smrd.ops.keystore)"""
    if getattr(args, "kube_secret", None):
        from ..ops import keystore  # only here: the roles never need the Kubernetes client
        return keystore.main(args)
    if getattr(args, "kube_configmap", None) or getattr(args, "kube_label", None):
        raise ConfigError("--kube-configmap and --kube-label go with --kube-secret, not --out")
    names = args.name or ["smrd"]
    if len(set(names)) != len(names):
        raise ConfigError(f"--name given twice for the same name ({', '.join(n for n in names if names.count(n) > 1)})")
    for name in names:  # check every name before writing anything: all key pairs or none
        check_key_name(name)
        for suffix in (SECRET_SUFFIX, PUBLIC_SUFFIX):
            path = os.path.join(args.out, name + suffix)
            if os.path.lexists(path):
                raise SmrdError(f"refusing to overwrite {path}; remove it first or pick another --name")
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise SmrdError(f"--out {args.out}: exists and is not a directory")
    try:
        os.makedirs(args.out, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise SmrdError(f"--out {args.out}: cannot create the directory ({exc.strerror})") from None
    for name in names:
        key_path, pub_path, public = keygen(args.out, name)
        print(f"{name}: secret key {key_path} (mode 0600), public key {pub_path}: {public.decode()}")
    print("next: give each process its own .key (curve_secret_key) and put every .pub in the "
          "allow-list directory (curve_public_keys); see docs/security.md")
    return 0
