"""A TCP proxy the tests put between the service and PostgreSQL, to cut it off."""

from __future__ import annotations

import socket
import struct
import threading


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target, or plays a dead network path."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.blackholed = False
        self.refusing = False
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _track(self, sock: socket.socket) -> None:
        with self.lock:
            self.sockets.append(sock)

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:  # the server is down: every connection is reset at once
                self._reset(client)
                continue
            self._track(client)
            if self.blackholed:
                continue  # accepted, never answered
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._track(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.blackholed:  # a black hole swallows bytes silently
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def blackhole(self) -> None:
        """Connections stay open but nothing gets through: no FIN, no RST, no answer."""
        self.blackholed = True

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        except OSError:
            pass

    def reset_all(self) -> None:
        """Abort every connection with a RST, as when the database host goes away."""
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            self._reset(sock)

    def refuse(self) -> None:
        """The database is down: open connections die, new ones are reset."""
        self.refusing = True
        self.reset_all()

    def restore(self) -> None:
        """Forward again; connections opened or silenced meanwhile are dropped."""
        self.reset_all()
        self.blackholed = False
        self.refusing = False

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.reset_all()
