"""Keeping the agent's certificate fresh without a restart.

The renewer asks for a new certificate at two thirds of the current one's lifetime,
and reloads the listener and the server client whenever the certificate file changes
(its own renewal, or `kitt-agent renew` run by the operator).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from kitt import pki
from kitt.agent.enrollment import renew
from kitt.errors import KittError
from kitt.http import CertFileWatcher, TlsFiles

log = logging.getLogger(__name__)

MAX_CHECK_S = 60.0
RETRY_S = 30.0


class CertRenewer(threading.Thread):
    def __init__(
        self,
        server_url: str,
        name: str,
        tls: TlsFiles,
        token: Callable[[], str | None],
        reload: Callable[[], None],
        insecure: bool = False,
    ) -> None:
        super().__init__(name="cert-renewer", daemon=True)
        assert tls.cert is not None  # noqa: S101 - only started for enrolled agents
        self._cert_path = tls.cert
        self._server_url = server_url
        self._name = name
        self._tls = tls
        self._token = token
        self._watcher = CertFileWatcher(tls.cert, reload)
        self._insecure = insecure
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while True:
            delay = self.check()
            if self._stop_event.wait(delay):
                return

    def check(self) -> float:
        """Reload if the file changed, renew if due; return seconds until the next check."""
        self._watcher.check()
        try:
            cert = pki.load_cert(self._cert_path)
        except pki.PkiError as exc:
            log.error("cannot read the agent certificate: %s", exc)
            return RETRY_S
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        # Check at least 20 times per lifetime so short test lifetimes renew on time.
        period = min(MAX_CHECK_S, lifetime.total_seconds() / 20)
        due = pki.renewal_due(cert)
        now = pki.utcnow()
        if now < due:
            return max(0.2, min(period, (due - now).total_seconds()))
        try:
            issued = renew(
                self._server_url, self._token(), self._tls, self._name, insecure=self._insecure
            )
        except KittError as exc:
            left = cert.not_valid_after_utc - now
            log.warning(
                "certificate renewal failed (%s); it expires in %s, retrying", exc,
                left if left > timedelta(0) else "no time: it HAS EXPIRED",
            )  # fmt: skip
            return min(RETRY_S, period)
        log.info("certificate renewed, valid until %s", issued.not_after.isoformat())
        self._watcher.check()  # serve it now
        return period
