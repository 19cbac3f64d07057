"""Run the admin app on uvicorn in a background thread of the process that holds the engine."""

from __future__ import annotations

import ipaddress
import logging
import threading
import time

import uvicorn

from kvtier.admin.app import create_app
from kvtier.admin.service import AdminService
from kvtier.config import AdminConfig
from kvtier.errors import ConfigError
from kvtier.security import Secret, load_secret

log = logging.getLogger("kvtier.admin")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token(config: AdminConfig) -> Secret | None:
    """The configured bearer token; ConfigError if it cannot be read, or none is set for a non-loopback host."""
    try:
        token = load_secret(config.token_file, config.token_env)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"admin API token: {exc}") from exc
    if token is None and not is_loopback(config.host):
        raise ConfigError(
            f"the admin API would listen on {config.host} without a token: set admin.token_file or "
            f"admin.token_env (a bearer token is required beyond localhost), or admin.host=127.0.0.1"
        )
    return token


class AdminServer:
    """uvicorn serving :func:`create_app` on ``config.host:config.port`` until :meth:`close`.

    Raises ConfigError (no token beyond localhost, unreadable token) or OSError (port taken) at start.
    """

    def __init__(self, config: AdminConfig, service: AdminService) -> None:
        token = admin_token(config)
        app = create_app(service, token)
        self.host, self.port = config.host, config.port
        self._server = uvicorn.Server(
            uvicorn.Config(app, host=config.host, port=config.port, log_level="warning", access_log=False)
        )
        self._thread = threading.Thread(target=self._server.run, name="kvtier-admin", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            if not self._thread.is_alive():
                raise OSError(f"kvtier admin API could not listen on {config.host}:{config.port}")
            if time.monotonic() > deadline:
                raise OSError("kvtier admin API did not start within 10 s")
            time.sleep(0.01)
        if self._server.servers and self.port == 0:
            self.port = self._server.servers[0].sockets[0].getsockname()[1]
        log.info("kvtier admin API on http://%s:%d (%s)", self.host, self.port, "token" if token else "no token")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5.0)
