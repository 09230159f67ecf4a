"""A TCP proxy on loopback that can lose its endpoint in the middle of an upload, at a chosen request.

In front of the moto S3 server: it forwards bytes both ways until the request line of the ``cut_at``-th
PUT of an object whose key matches ``pattern`` arrives; it then closes every connection and stops listening,
as an endpoint that went away does (the earlier uploads went through whole). ``restore()`` listens again
on the same port.
"""

from __future__ import annotations

import re
import socket
import threading


class CuttableProxy:
    def __init__(self, target_port: int, pattern: bytes = rb"\.parquet", cut_at: int | None = None) -> None:
        self.target = ("127.0.0.1", target_port)
        self.request = re.compile(rb"PUT /[^ \r\n]*" + pattern + rb"[^ \r\n]* HTTP/1\.[01]\r\n")
        self.cut_at, self.seen = cut_at, 0
        self.log: list[bytes] = []  # the first line of every chunk from a client (for failure messages)
        self.cut = threading.Event()  # set while the endpoint is lost
        self.outages = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.port = self._listen(0)

    def _listen(self, port: int) -> int:
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", port))
        self._server.listen(64)
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()
        return self._server.getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # closed by _drop()
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        tail = b""
        try:
            while data := src.recv(65536):
                if from_client:
                    self.log.append(data[:120])
                if from_client and self.cut_at is not None:  # count the matching request lines so far
                    window = tail + data
                    with self._lock:
                        self.seen += len(self.request.findall(window)) - len(self.request.findall(tail))
                        lose = self.seen >= self.cut_at
                    tail = window[-512:]
                    if lose:
                        self._cut()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _cut(self) -> None:
        if not self.cut.is_set():
            self.outages += 1
        self.cut.set()
        self._drop()

    def _drop(self) -> None:
        self._server.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def restore(self) -> None:
        """Listen again on the same port and forward everything."""
        self.cut_at = None
        self.cut.clear()
        self._listen(self.port)

    def close(self) -> None:
        self.cut_at = None
        self._drop()
