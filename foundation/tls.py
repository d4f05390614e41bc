"""TLS to MariaDB, per site: how a role, the façade and the command line encrypt their connections.

Modes, set per server (`DJLINK_SOURCE_TLS`, `DJLINK_DEST_TLS`):

- `off`: plain text;
- `preferred` (the default, as DataJoint's `use_tls=None`): encrypted when the server offers TLS, plain text
  when it does not; the server's certificate is not checked;
- `required`: encrypted, or no connection; the certificate is not checked;
- `verify`: encrypted, and the server's certificate must be signed by the CA (`..._TLS_CA`) and name the host.

A client certificate (`..._TLS_CERT`, `..._TLS_KEY`) is sent when given, for users created `REQUIRE X509`.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MODES = ("off", "preferred", "required", "verify")
CR_SSL_CONNECTION_ERROR = 2026  # PyMySQL: TLS asked for, the server offers none


class TlsError(Exception):
    """A TLS setting the server or its certificate does not satisfy; the message names the setting."""


@dataclass(frozen=True)
class Tls:
    mode: str = "preferred"
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    setting: str = "DJLINK_SOURCE_TLS"  # the variable that set it, for messages

    @classmethod
    def from_env(cls, env: Mapping[str, str], prefix: str) -> Tls:
        """`<prefix>_TLS` and `<prefix>_TLS_CA/_CERT/_KEY` (prefix `DJLINK_SOURCE` or `DJLINK_DEST`)."""
        setting = f"{prefix}_TLS"
        mode = (env.get(setting) or "preferred").strip().lower()
        if mode not in MODES:
            raise TlsError(f"{setting}={mode!r} is not one of {', '.join(MODES)}")
        tls = cls(
            mode,
            env.get(f"{setting}_CA") or None,
            env.get(f"{setting}_CERT") or None,
            env.get(f"{setting}_KEY") or None,
            setting,
        )
        if mode == "verify" and tls.ca is None:
            raise TlsError(f"{setting}=verify needs the CA that signed the server's certificate: set {setting}_CA")
        if (tls.cert is None) != (tls.key is None):
            raise TlsError(f"{setting}_CERT and {setting}_KEY go together (a client certificate and its key)")
        return tls

    def context(self) -> ssl.SSLContext | None:
        """The TLS context of a connection (None: plain text)."""
        if self.mode == "off":
            return None
        try:
            ctx = ssl.create_default_context(cafile=self.ca if self.mode == "verify" else None)
            if self.mode != "verify":
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if self.cert is not None:
                ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"{self.setting}: cannot load the certificates ({exc})") from None
        return ctx

    def datajoint(self) -> Any:
        """The same setting as DataJoint's `database.use_tls` takes it (None: try TLS, then plain text)."""
        if self.mode == "off":
            return False
        if self.mode == "preferred":
            return None
        options: dict[str, Any] = {}
        if self.mode == "verify":
            options.update(ca=self.ca, check_hostname=True, verify_mode=True)
        if self.cert is not None:
            options.update(cert=self.cert, key=self.key)
        return options or True

    def refused(self, exc: BaseException, host: str) -> TlsError | None:
        """The user's words for a connection error that TLS caused; None when it is not one."""
        args = getattr(exc, "args", ())
        code, message = (args[0], str(args[1]) if len(args) > 1 else "") if args else (0, "")
        if code == CR_SSL_CONNECTION_ERROR:
            return TlsError(
                f"the server at {host} does not offer TLS but {self.setting}={self.mode}: enable TLS on it "
                f"(ssl_cert, ssl_key) or set {self.setting}=preferred"
            )
        if "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message:
            return TlsError(
                f"the certificate of the server at {host} does not verify ({message.split('(', 1)[-1].rstrip(')')}): "
                f"check {self.setting}_CA, and that the certificate names {host}"
            )
        return None
