"""``direct://HOST:PORT``: TCP between the ranks, connected through the rendezvous server at HOST:PORT.

Each rank binds one port (SO_REUSEADDR and SO_REUSEPORT) and uses it for everything: it listens there, reaches
the server from there (so the server sees the address its peers must use, after any NAT) and connects to every
peer from there, while the peer connects to it from its own. Between two fixed ports there is only one TCP
connection, so whichever way it forms (an accept, a connect, or both connects at once: a simultaneous open, which
is what crosses two NATs) both sides end up with the same one. Before anything else both sides prove they hold
the run's secret, challenge and response: each sends a hello (the run, its rank, a fresh nonce), then a tag over
both ranks and both nonces. A connection that does not come from the address the server saw for the rank it
claims, a hello or tag longer than a few hundred bytes, or one that is not what it should be, is closed: nothing
that has not proved itself makes a rank hold more than that.

The port is bound to the address this rank reaches the rendezvous server from (loopback when the server is on
loopback), so no other interface hears it; ``bind`` (``--comm-bind``) names another where peers arrive elsewhere
(a node whose fast network is not the one the server is on). The server sees a token derived from the secret.

A pair that has not connected when ``connect_timeout_s`` runs out talks through the fallback channel instead
(``info()["fallback_pairs"]`` says which); without one, that is an error. Which pairs fall back is decided once
for the run, by the rendezvous server from every rank's account (``settle``): where one side of a pair connected
and the other gave up, both take the fallback, never one each. Once connected, the sockets are
non-blocking and each rank's own thread reads and writes them (no reader threads: one less thread to wake per
message); a peer whose connection ends without a goodbye is gone, and a rank waiting on it is told at once.
"""

from __future__ import annotations

import hmac
import json
import secrets
import select
import socket
import struct
import threading
import time
from collections import deque

from cai_bench.comm.channel import Channel
from cai_bench.comm.frames import CommError
from cai_bench.comm.seal import derive
from cai_bench.comm.urls import parse_direct_url

_LENGTH = struct.Struct("!I")
SETTLE_LIST_MAX = 500  # peers a settle request names one by one; more is "all" (a request line is 4 KiB at most)
_GOODBYE = b""
_HELLO_MAX = 256  # bytes of a hello or a tag: all a connection may send before its peer has proved itself
_CLOSE_S = 5.0  # how long a goodbye may take to leave


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _shared_port_socket(family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def resolve(server: tuple[str, int]) -> tuple[str, int]:
    """The rendezvous server's address as a numeric (host, port): IPv4 first for a name (as before IPv6 was taken),
    so that ``localhost`` reaches a server on 127.0.0.1."""
    try:
        info = socket.getaddrinfo(server[0], server[1], type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CommError(f"direct://{server[0]}:{server[1]}: cannot resolve the rendezvous server ({exc})") from None
    info.sort(key=lambda entry: entry[0] != socket.AF_INET)
    return info[0][4][0], info[0][4][1]


def local_address(server: tuple[str, int]) -> str:
    """The address of the interface this machine reaches ``server`` from (no packet is sent)."""
    with socket.socket(_family(server[0]), socket.SOCK_DGRAM) as probe:
        probe.connect(server)
        return probe.getsockname()[0]


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_small_frame(sock: socket.socket) -> bytes | None:
    """A frame of at most ``_HELLO_MAX`` bytes; None for anything longer (unread) or a connection that ended."""
    head = _read_exact(sock, _LENGTH.size)
    if head is None or _LENGTH.unpack(head)[0] > _HELLO_MAX:
        return None
    return _read_exact(sock, _LENGTH.unpack(head)[0])


def _write_frame(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(frame)) + frame)


def response(key: bytes, sender: int, receiver: int, sender_nonce: bytes, receiver_nonce: bytes) -> bytes:
    """The tag ``sender`` answers ``receiver``'s challenge with: both ranks and both nonces under the run's key,
    so it proves the secret for this connection only (a captured one fails on the next, whose nonces differ)."""
    return hmac.digest(key, f"{sender}>{receiver}:".encode() + sender_nonce + receiver_nonce, "sha256")


def parse_hello(data: bytes | None, run_id: str, world_size: int, me: int) -> tuple[int, bytes] | None:
    """(the peer's rank, its nonce) from a hello of this run; None for anything else."""
    try:
        hello = json.loads(data) if data else None
        if not isinstance(hello, dict) or hello.get("run") != run_id:
            return None
        rank, nonce = hello.get("rank"), hello.get("nonce")
        if type(rank) is not int or not 0 <= rank < world_size or rank == me:
            return None
        if not isinstance(nonce, str) or len(nonce) != 32:
            return None
        return rank, bytes.fromhex(nonce)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def rendezvous(server: tuple[str, int], sock: socket.socket, request: dict, timeout_s: float) -> dict:
    """One request to the server over ``sock`` (already connected): its answer, or a CommError."""
    sock.settimeout(timeout_s + 5)
    sock.sendall(json.dumps(request).encode() + b"\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise CommError(f"rendezvous {server[0]}:{server[1]} closed the connection")
        line += chunk
        if len(line) > 1 << 24:
            raise CommError(f"rendezvous {server[0]}:{server[1]}: an answer over 16 MiB; is it a rendezvous server?")
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict):
        raise CommError(
            f"rendezvous {server[0]}:{server[1]}: its answer is not a JSON object; is it a rendezvous server?"
        )
    if "error" in answer:
        raise CommError(f"rendezvous {server[0]}:{server[1]}: {str(answer['error'])[:300]}")
    return answer


def _peer_addresses(answer: dict, world_size: int, url: str) -> dict[int, tuple[str, int]]:
    """The server's ``peers`` answer as {rank: (host, port)}, every rank of the world there and well formed."""
    try:
        peers = {int(r): (str(a[0]), int(a[1])) for r, a in answer["peers"].items()}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        peers = {}
    if sorted(peers) != list(range(world_size)):
        raise CommError(f"{url}: the rendezvous server's list of peers is not one address per rank")
    return peers


class DirectChannel:
    scheme = "direct"
    peer_to_peer = True

    def __init__(
        self,
        url: str,
        rank: int,
        world_size: int,
        run_id: str,
        timeout_s: float,
        key: str,
        fallback: Channel | None = None,
        connect_timeout_s: float | None = None,
        bind: str | None = None,
    ):
        self.url, self.rank, self.world_size, self.run_id = url, rank, world_size, run_id
        self._handshake_key = derive(key, "direct", run_id)
        self.fallback = fallback
        self._socks: dict[int, socket.socket] = {}
        self._peer_of: dict[socket.socket, int] = {}
        self._inbox: dict[int, deque] = {r: deque() for r in range(world_size)}
        self._buffers: dict[int, bytearray] = {r: bytearray() for r in range(world_size)}
        self._ended: set[int] = set()  # connections that ended
        self._left: set[int] = set()  # peers that said goodbye first
        self._gone: set[int] = set()  # peers whose connection ended without one: they died
        self._lock = threading.Lock()
        server = resolve(parse_direct_url(url))
        self._family = _family(server[0])
        self._listener = self._control = None
        try:
            self.bound = bind or local_address(server)
            self._listener = _shared_port_socket(self._family)
            self._listener.bind((self.bound, 0))
            self._port = self._listener.getsockname()[1]
            self._listener.listen(max(8, world_size))
            self._control = _shared_port_socket(self._family)
            self._control.bind((self.bound, self._port))
            self._control.settimeout(min(10.0, timeout_s))
            self._control.connect(server)
            # The server sees a token of the run, never the secret itself
            base = {"run": run_id, "key": derive(key, "rendezvous", run_id).hex()}
            self.public = rendezvous(
                server, self._control, {**base, "op": "register", "rank": rank, "world": world_size}, timeout_s
            )["address"]
            peers = rendezvous(server, self._control, {**base, "op": "peers", "timeout": timeout_s}, timeout_s)
            self._settle_with = (server, base, timeout_s)
        except (OSError, CommError) as exc:
            for sock in (self._listener, self._control):
                if sock is not None:
                    sock.close()
            if isinstance(exc, CommError):
                raise
            raise CommError(f"{url}: cannot reach the rendezvous server from {bind or 'here'} ({exc})") from None
        self.addresses = _peer_addresses(peers, world_size, url)
        self._connect_all(connect_timeout_s if connect_timeout_s is not None else min(timeout_s, 20.0))

    # ---------------------------------------------------------------------------------------- connecting

    def _connect_all(self, within_s: float) -> None:
        deadline = time.monotonic() + within_s
        others = [r for r in range(self.world_size) if r != self.rank]
        threads = [threading.Thread(target=self._accept_until, args=(deadline,), daemon=True)]
        threads += [threading.Thread(target=self._dial, args=(r, deadline), daemon=True) for r in others]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self._listener.close()
        self.fallback_pairs = self._settle([r for r in others if r not in self._socks])
        if self.fallback_pairs and self.fallback is None:
            raise CommError(
                f"rank {self.rank} could not connect directly to rank(s) "
                f"{[p[0] if p[1] == self.rank else p[1] for p in self.fallback_pairs]} within "
                f"{within_s:g} s, and no fallback channel was given (--comm direct://...,redis://...)"
            )

    def _settle(self, unreached: list[int]) -> list[tuple[int, int]]:
        """This rank's pairs that fall back, as the server decided from every rank's ``unreached``: a connection
        this rank holds to a peer that gave up on it is closed, unused, since that peer takes the fallback."""
        server, base, timeout_s = self._settle_with
        missing = unreached if len(unreached) < SETTLE_LIST_MAX else "all"
        answer = rendezvous(server, self._control, {**base, "op": "settle", "rank": self.rank, "missing": missing,
                                                    "timeout": timeout_s}, timeout_s)  # fmt: skip
        try:
            pairs = {(int(a), int(b)) for a, b in answer["fallback"]}
        except (KeyError, TypeError, ValueError):
            raise CommError(f"{self.url}: the rendezvous server's settle answer is not a list of pairs") from None
        mine = sorted(p for p in pairs if self.rank in p)
        for pair in mine:
            sock = self._socks.pop(pair[0] if pair[1] == self.rank else pair[1], None)
            if sock is not None:
                self._peer_of.pop(sock, None)
                sock.close()
        return mine

    def _accept_until(self, deadline: float) -> None:
        while time.monotonic() < deadline and len(self._socks) < self.world_size - 1:
            self._listener.settimeout(max(0.01, min(0.1, deadline - time.monotonic())))
            try:
                sock, _ = self._listener.accept()
            except OSError:
                continue
            threading.Thread(target=self._greet, args=(sock, None, deadline), daemon=True).start()

    def _dial(self, peer: int, deadline: float) -> None:
        delay = 0.005
        while time.monotonic() < deadline and peer not in self._socks:
            sock = _shared_port_socket(self._family)
            try:
                sock.bind((self.bound, self._port))
                sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
                sock.connect(self.addresses[peer])
            except OSError:  # refused (not listening yet, or behind a NAT that drops it), or the pair already joined
                sock.close()
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            self._greet(sock, peer, deadline)

    def _greet(self, sock: socket.socket, expected: int | None, deadline: float) -> None:
        """Challenge and response both ways; the connection is kept for the peer it proves to be, if that pair
        has none yet. Anything else (no proof, a wrong one, a hello too long or of the wrong shape) closes it."""
        peer = self._prove(sock, deadline)
        with self._lock:
            keep = (
                peer is not None
                and (expected is None or peer == expected)
                and peer not in self._socks
                and time.monotonic() < deadline
            )
            if keep:
                self._socks[peer] = sock
                self._peer_of[sock] = peer
        if not keep:
            sock.close()
            return
        sock.setblocking(False)  # from here on, each rank's own thread reads and writes, never blocking on one peer

    def _prove(self, sock: socket.socket, deadline: float) -> int | None:
        """The rank the other end proved to be, or None."""
        nonce = secrets.token_bytes(16)
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _write_frame(sock, json.dumps({"run": self.run_id, "rank": self.rank, "nonce": nonce.hex()}).encode())
            hello = parse_hello(_read_small_frame(sock), self.run_id, self.world_size, self.rank)
            if hello is None:
                return None
            peer, their_nonce = hello
            if tuple(sock.getpeername()[:2]) != tuple(self.addresses[peer]):
                return None  # not from where the server saw that rank: a relay between two ranks, say
            _write_frame(sock, response(self._handshake_key, self.rank, peer, nonce, their_nonce))
            answer = _read_small_frame(sock) or b""
            proved = hmac.compare_digest(answer, response(self._handshake_key, peer, self.rank, their_nonce, nonce))
        except OSError:
            return None
        return peer if proved else None

    # ----------------------------------------------------------------------------------------- messages

    def _direct(self, peer: int) -> bool:
        return peer in self._socks

    def _pump(self, peer: int) -> None:
        """Whatever ``peer`` has sent by now into its inbox, frame by frame; an end without a goodbye: it died."""
        sock, buffer = self._socks[peer], self._buffers[peer]
        while peer not in self._ended:
            try:
                chunk = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._ended.add(peer)
                if peer not in self._left:
                    self._gone.add(peer)
                return
            buffer += chunk
            while len(buffer) >= _LENGTH.size and len(buffer) >= _LENGTH.size + _LENGTH.unpack_from(buffer)[0]:
                size = _LENGTH.unpack_from(buffer)[0]
                frame = bytes(buffer[_LENGTH.size : _LENGTH.size + size])
                del buffer[: _LENGTH.size + size]
                if frame == _GOODBYE:
                    self._left.add(peer)
                else:
                    self._inbox[peer].append(frame)

    def send(self, dst: int, frame: bytes, deadline: float) -> None:
        """Written without blocking on ``dst``: while its socket is full, whatever any peer sends is read, so two
        ranks sending each other (or a ring of them) large messages at once never wait on each other. A peer
        that stops reading makes it fail at ``deadline``."""
        if not self._direct(dst):
            self.fallback.send(dst, frame, deadline)
            return
        view, sock = memoryview(_LENGTH.pack(len(frame)) + frame), self._socks[dst]
        try:
            while view:
                try:
                    view = view[sock.send(view) :]
                except (BlockingIOError, InterruptedError):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise CommError(
                            f"rank {self.rank}: rank {dst} took nothing more over direct for the whole timeout "
                            f"({len(view)} bytes of a message unsent)"
                        ) from None
                    readable, _, _ = select.select(self._open_sockets(), [sock], [], min(1.0, left))
                    for peer_sock in readable:
                        self._pump(self._peer_of[peer_sock])
        except OSError as exc:
            self._gone.add(dst)
            raise CommError(f"rank {self.rank}: rank {dst} is gone (its connection failed: {exc})") from None

    def dropped(self, src: int) -> None:
        if not self._direct(src):
            self.fallback.dropped(src)

    def _open_sockets(self) -> list[socket.socket]:
        return [sock for peer, sock in self._socks.items() if peer not in self._ended]

    def recv(self, src: int, deadline: float) -> bytes | None:
        if not self._direct(src):
            return self.fallback.recv(src, deadline)
        inbox = self._inbox[src]
        while not inbox:
            left = deadline - time.monotonic()
            if src in self._ended or left <= 0:
                return None  # it died (or left): every later wait on it ends at once too
            select.select([self._socks[src]], [], [], left)
            self._pump(src)
        return inbox.popleft()

    def missing(self) -> list[int]:
        for peer in list(self._socks):
            self._pump(peer)  # an end that came while this rank waited on another is seen now
        gone = set(self._gone)
        if self.fallback is not None and self.fallback_pairs:
            gone |= set(self.fallback.missing())
        return sorted(gone)

    def info(self) -> dict:
        return {
            "scheme": self.scheme,
            "url": self.url,
            "public_address": list(self.public),
            "bound": self.bound,
            "fallback_pairs": [list(p) for p in self.fallback_pairs],
            "fallback": self.fallback.scheme if self.fallback is not None and self.fallback_pairs else None,
        }

    def close(self) -> None:
        deadline = time.monotonic() + _CLOSE_S  # a peer that stopped reading does not hold this rank's exit
        for peer, sock in list(self._socks.items()):
            try:
                if peer not in self._ended:
                    self.send(peer, _GOODBYE, deadline)
                sock.shutdown(socket.SHUT_WR)
            except (OSError, CommError):
                pass
        for sock in self._socks.values():
            sock.close()
        self._control.close()  # the fallback is the communicator's to close: it may carry operations of its own
