"""``direct://HOST:PORT``: TCP between the ranks, connected through the rendezvous server at HOST:PORT.

Each rank binds one port (SO_REUSEADDR and SO_REUSEPORT) and uses it for everything: it listens there, reaches
the server from there (so the server sees the address its peers must use, after any NAT) and connects to every
peer from there, while the peer connects to it from its own. Between two fixed ports there is only one TCP
connection, so whichever way it forms (an accept, a connect, or both connects at once: a simultaneous open, which
is what crosses two NATs) both sides end up with the same one. Both send a hello naming the run, their rank and
a proof of the run's key before anything else.

A pair that has not connected when ``connect_timeout_s`` runs out talks through the fallback channel instead
(``info()["fallback_pairs"]`` says which); without one, that is an error. Once connected, the sockets are
non-blocking and each rank's own thread reads and writes them (no reader threads: one less thread to wake per
message); a peer whose connection ends without a goodbye is gone, and a rank waiting on it is told at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import select
import socket
import struct
import threading
import time
from collections import deque

from cai_bench.comm.channel import Channel
from cai_bench.comm.frames import CommError

_LENGTH = struct.Struct("!I")
_GOODBYE = b""


def parse_direct_url(url: str) -> tuple[str, int]:
    body = url[len("direct://") :] if url.startswith("direct://") else ""
    host, _, port = body.rstrip("/").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommError(f"{url!r}: write direct://HOST:PORT (the rendezvous server, cai-bench comm rendezvous)")
    return host, int(port)


def _shared_port_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(sock: socket.socket) -> bytes | None:
    head = _read_exact(sock, _LENGTH.size)
    return None if head is None else _read_exact(sock, _LENGTH.unpack(head)[0])


def _write_frame(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(frame)) + frame)


def proof(key: str, run_id: str, rank: int) -> str:
    return hmac.new(key.encode(), f"{run_id}:{rank}".encode(), hashlib.sha256).hexdigest()


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
    answer = json.loads(line)
    if "error" in answer:
        raise CommError(f"rendezvous {server[0]}:{server[1]}: {answer['error']}")
    return answer


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
    ):
        self.url, self.rank, self.world_size, self.run_id, self._key = url, rank, world_size, run_id, key
        self.fallback = fallback
        self._socks: dict[int, socket.socket] = {}
        self._peer_of: dict[socket.socket, int] = {}
        self._inbox: dict[int, deque] = {r: deque() for r in range(world_size)}
        self._buffers: dict[int, bytearray] = {r: bytearray() for r in range(world_size)}
        self._ended: set[int] = set()  # connections that ended
        self._left: set[int] = set()  # peers that said goodbye first
        self._gone: set[int] = set()  # peers whose connection ended without one: they died
        self._lock = threading.Lock()
        server = parse_direct_url(url)
        self._listener = _shared_port_socket()
        self._listener.bind(("0.0.0.0", 0))
        self._port = self._listener.getsockname()[1]
        self._listener.listen(max(8, world_size))
        self._control = _shared_port_socket()
        self._control.bind(("0.0.0.0", self._port))
        try:
            self._control.settimeout(min(10.0, timeout_s))
            self._control.connect(server)
            base = {"run": run_id, "key": key}
            self.public = rendezvous(
                server, self._control, {**base, "op": "register", "rank": rank, "world": world_size}, timeout_s
            )["address"]
            peers = rendezvous(server, self._control, {**base, "op": "peers", "timeout": timeout_s}, timeout_s)
        except OSError as exc:
            self._listener.close()
            self._control.close()
            raise CommError(f"{url}: cannot reach the rendezvous server ({exc})") from None
        self.addresses = {int(r): (h, p) for r, (h, p) in peers["peers"].items()}
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
        self.fallback_pairs = sorted(tuple(sorted((self.rank, r))) for r in others if r not in self._socks)
        if self.fallback_pairs and self.fallback is None:
            raise CommError(
                f"rank {self.rank} could not connect directly to rank(s) "
                f"{[p[0] if p[1] == self.rank else p[1] for p in self.fallback_pairs]} within "
                f"{within_s:g} s, and no fallback channel was given (--comm direct://...,redis://...)"
            )

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
            sock = _shared_port_socket()
            try:
                sock.bind(("0.0.0.0", self._port))
                sock.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
                sock.connect(self.addresses[peer])
            except OSError:  # refused (not listening yet, or behind a NAT that drops it), or the pair already joined
                sock.close()
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            self._greet(sock, peer, deadline)

    def _greet(self, sock: socket.socket, expected: int | None, deadline: float) -> None:
        """Hellos both ways; the connection is kept for the peer it proves to be, if that pair has none yet."""
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _write_frame(
                sock,
                json.dumps(
                    {"run": self.run_id, "rank": self.rank, "proof": proof(self._key, self.run_id, self.rank)}
                ).encode(),
            )
            hello = json.loads(_read_frame(sock) or b"{}")
            peer = int(hello.get("rank", -1))
            valid = (
                hello.get("run") == self.run_id
                and 0 <= peer < self.world_size
                and peer != self.rank
                and hmac.compare_digest(str(hello.get("proof", "")), proof(self._key, self.run_id, peer))
            )
        except (OSError, ValueError):
            valid = False
        with self._lock:
            keep = (
                valid
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

    def send(self, dst: int, frame: bytes) -> None:
        """Written without blocking on ``dst``: while its socket is full, whatever any peer sends is read, so two
        ranks sending each other (or a ring of them) large messages at once never wait on each other."""
        if not self._direct(dst):
            self.fallback.send(dst, frame)
            return
        view, sock = memoryview(_LENGTH.pack(len(frame)) + frame), self._socks[dst]
        try:
            while view:
                try:
                    view = view[sock.send(view) :]
                except (BlockingIOError, InterruptedError):
                    readable, _, _ = select.select(self._open_sockets(), [sock], [], 1.0)
                    for peer_sock in readable:
                        self._pump(self._peer_of[peer_sock])
        except OSError as exc:
            self._gone.add(dst)
            raise CommError(f"rank {self.rank}: rank {dst} is gone (its connection failed: {exc})") from None

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
            "fallback_pairs": [list(p) for p in self.fallback_pairs],
            "fallback": self.fallback.scheme if self.fallback is not None and self.fallback_pairs else None,
        }

    def close(self) -> None:
        for peer, sock in list(self._socks.items()):
            try:
                if peer not in self._ended:
                    self.send(peer, _GOODBYE)
                sock.shutdown(socket.SHUT_WR)
            except (OSError, CommError):
                pass
        for sock in self._socks.values():
            sock.close()
        self._control.close()  # the fallback is the communicator's to close: it may carry operations of its own
