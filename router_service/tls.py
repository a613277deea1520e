"""TLS for the gateway's ports and its clients: the files named by --tls-cert/--tls-key/--tls-client-ca
(server) and --tls-ca/--tls-cert/--tls-key (client), read once and checked up front so that a wrong
path or a key that does not match its certificate is a usage error naming the flag, not a failed
handshake later."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


class TlsError(ValueError):
    """A TLS file cannot be used; the message names the flag."""


def _read(path: str | Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"{flag} {path}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise TlsError(f"{flag} {path}: not a PEM file (expected '-----BEGIN ...')")
    return data


@dataclass(frozen=True)
class TlsFiles:
    """The server side: certificate chain and key, and for mutual TLS the CA that signs client certs."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_flags(cls, cert: str | None, key: str | None, client_ca: str | None = None) -> "TlsFiles | None":
        if cert is None and key is None:
            if client_ca is not None:
                raise TlsError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
            return None
        if cert is None or key is None:
            raise TlsError("--tls-cert and --tls-key go together: give both")
        tls = cls(Path(cert), Path(key), Path(client_ca) if client_ca else None)
        tls.check()
        return tls

    def check(self) -> None:
        """Load everything as OpenSSL would, so a bad file fails here, naming its flag."""
        _read(self.cert, "--tls-cert"), _read(self.key, "--tls-key"), _read(self.client_ca, "--tls-client-ca")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except ssl.SSLError as e:
            raise TlsError(f"--tls-cert {self.cert} / --tls-key {self.key}: {e.reason or e} "
                           "(is the key the certificate's own?)") from None
        if self.client_ca is not None:
            try:
                ctx.load_verify_locations(str(self.client_ca))
            except ssl.SSLError as e:
                raise TlsError(f"--tls-client-ca {self.client_ca}: {e.reason or e}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        ca = _read(self.client_ca, "--tls-client-ca")
        return grpc.ssl_server_credentials([(_read(self.key, "--tls-key"), _read(self.cert, "--tls-cert"))],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def uvicorn_options(self) -> dict:
        """The same certificate for the HTTP port (and client certificates required with a client CA)."""
        opts = {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key)}
        if self.client_ca is not None:
            opts.update(ssl_ca_certs=str(self.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return opts

    def describe(self) -> str:
        return (f"TLS with certificate {self.cert}" +
                (f", client certificates required (signed by {self.client_ca})" if self.client_ca else ""))


def client_credentials(ca: str | None = None, cert: str | None = None,
                       key: str | None = None) -> grpc.ChannelCredentials:
    """Channel credentials for a TLS server: `ca` verifies the server (None: the system's roots);
    `cert`/`key`: this client's certificate, for mutual TLS."""
    if (cert is None) != (key is None):
        raise TlsError("--tls-cert and --tls-key go together: give both")
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "--tls-ca"),
                                        private_key=_read(key, "--tls-key"),
                                        certificate_chain=_read(cert, "--tls-cert"))
