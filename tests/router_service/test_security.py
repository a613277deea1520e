"""Input hardening, authentication and TLS of the gateway, over real gRPC and HTTP on loopback: malformed
bytes and out-of-range fields get INVALID_ARGUMENT (HTTP 400) naming the field and no traceback in the
log; bearer tokens decide the tenant (a spoofed x-tenant-id gets no cross-tenant cache hit); TLS and
mutual TLS with certificates made on the fly; `mesh serve`/`mesh generate --target` with those flags."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx2 as httpx  # the HTTP client the openai package is built on
import pytest

from conftest import LiveGateway, LogCapture, engine_factory
from router_service.auth import (Caller, PermissionDenied, TokenFileError, TokenTable, Unauthenticated, identify,
                                 require_role)
from router_service.client import MeshClient, MeshError
from router_service.protos import inference_pb2 as pb
from router_service.tls import TlsError, TlsFiles

ROOT = Path(__file__).resolve().parents[2]
GENERATE = "/mesh.v1.Inference/Generate"
COMPLETE = "/mesh.v1.Inference/Complete"
TOKEN_A, TOKEN_B, TOKEN_ADMIN = "tok-a-" + "a" * 20, "tok-b-" + "b" * 20, "tok-admin-" + "c" * 20


@pytest.fixture
def logs():
    cap = LogCapture()
    root = logging.getLogger()
    old = root.level
    root.addHandler(cap)
    root.setLevel(logging.DEBUG)
    yield cap
    root.removeHandler(cap)
    root.setLevel(old)


@pytest.fixture(scope="module")
def open_gw(tiny_dir):
    live = LiveGateway(engine_factory(tiny_dir), http_port=0, model_name="tiny")
    yield live
    live.close()


def _raw(target: str, method: str, payload: bytes, streaming=True, metadata=None, timeout=30):
    """Send raw bytes as the request message (identity serializers), collect the raw responses."""
    with grpc.insecure_channel(target) as ch:
        ident = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
        if streaming:
            return list(ch.unary_stream(method, **ident)(payload, timeout=timeout, metadata=metadata))
        return ch.unary_unary(method, **ident)(payload, timeout=timeout, metadata=metadata)


# ---- input hardening ------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28",  # bad varint, short, bad UTF-8
                                     b"\x1a\x80\x80\x80\x80\x10"])
@pytest.mark.parametrize("method,streaming", [(GENERATE, True), (COMPLETE, False),
                                              ("/mesh.v1.Inference/Tokenize", False),
                                              ("/grpc.health.v1.Health/Check", False)])
def test_malformed_bytes_are_invalid_argument_without_traceback(open_gw, logs, payload, method, streaming):
    with pytest.raises(grpc.RpcError) as e:
        _raw(open_gw.target, method, payload, streaming)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value
    assert "not a valid" in e.value.details() and "Request" in e.value.details()
    assert logs.tracebacks() == []
    assert MeshClient(open_gw.target).health() == "SERVING"


def test_health_watch_still_streams(open_gw):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(open_gw.target) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


@pytest.mark.parametrize("kw,field", [
    (dict(prompt_token_ids=[1, 2, 3], max_tokens=4294967295), "sampling.max_tokens"),
    (dict(prompt_token_ids=[1] * 2000, max_tokens=49), "sampling.max_tokens"),
    (dict(prompt_token_ids=[1, 2], stop_token_ids=[5, 1 << 20]), "stop_token_ids"),
    (dict(prompt_token_ids=[1, 2], request_id="x" * 100_000), "request_id"),
    (dict(prompt_token_ids=[1, 2], max_tokens=0), "max_tokens"),
    (dict(prompt_token_ids=[1, 2], n=1000), "n"),
    (dict(prompt_token_ids=[1, 2], top_p=2.0), "top_p"),
    (dict(prompt_token_ids=[1, 1 << 30]), "prompt token id"),
])
def test_out_of_range_fields_are_invalid_argument_naming_the_field(open_gw, logs, kw, field):
    with MeshClient(open_gw.target, timeout=30) as c:
        for call in (c.complete, lambda **k: list(c.generate(**k))):
            with pytest.raises(MeshError) as e:
                call(**kw)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert field in e.value.details, e.value.details
            assert len(e.value.details) < 500  # the 100 KB request id is not echoed
    assert logs.tracebacks() == []
    open_gw.wait_idle()


def test_context_limit_message_and_defaults(open_gw):
    with MeshClient(open_gw.target, timeout=60) as c:
        with pytest.raises(MeshError) as e:
            c.complete(prompt_token_ids=[1] * 2000, max_tokens=100)
        # the numbers, as vLLM reports them: context, total asked, prompt, completion, what would fit
        assert all(s in e.value.details for s in ("2048", "2100", "2000 in the prompt", "100 to generate",
                                                  "at most 48"))
        # exactly what fits is served; the unset default is cut short by the context (no error)
        assert len(c.complete(prompt_token_ids=[1] * 2000, max_tokens=48, ignore_eos=True)["token_ids"]) == 48
        out = c.complete(prompt_token_ids=[1] * 2040, ignore_eos=True)
        assert (len(out["token_ids"]), out["finish_reason"]) == (8, "length")
        assert len(c.complete(prompt_token_ids=[1, 2], request_id="r" * 256, max_tokens=2)["token_ids"]) == 2


def test_http_rejects_out_of_range_fields_with_400(open_gw, logs):
    url = f"http://127.0.0.1:{open_gw.gw.http_port}/v1/completions"
    cases = [({"max_tokens": 4294967295}, "max_tokens"), ({"stop_token_ids": [1 << 20]}, "stop_token_ids"),
             ({"prompt": [1] * 2000, "max_tokens": 100}, "max_tokens")]
    for extra, field in cases:
        body = {"model": "tiny", "prompt": [1, 2, 3], **extra}
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]["message"]
    chat = httpx.post(f"http://127.0.0.1:{open_gw.gw.http_port}/v1/chat/completions", timeout=30,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                            "max_completion_tokens": 5000})
    assert chat.status_code == 400 and "max_completion_tokens" in chat.json()["error"]["message"]
    r = httpx.post(url, content=b"\xff{not json", timeout=30)
    assert r.status_code == 400
    from router_service.server import MAX_MESSAGE_BYTES
    r = httpx.post(url, content=b" " * (MAX_MESSAGE_BYTES + 1), timeout=60)
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]

    def chunks():  # no content-length: the limit holds while reading
        for _ in range(MAX_MESSAGE_BYTES // (1 << 20) + 2):
            yield b" " * (1 << 20)
    r = httpx.post(url, content=chunks(), timeout=60)
    assert r.status_code == 413
    assert logs.tracebacks() == []
    open_gw.wait_idle()


# ---- authentication -------------------------------------------------------------------------------
def test_token_file_parsing(tmp_path):
    import hashlib
    digest = hashlib.sha256(TOKEN_B.encode()).hexdigest()
    t = TokenTable.parse(f"# comment\n\n{TOKEN_A} acme\nsha256:{digest} beta admin\n")
    assert t.lookup(TOKEN_A) == ("acme", "user") and t.lookup(TOKEN_B) == ("beta", "admin")
    assert t.lookup("nope" * 5) is None
    for bad, words in [("short acme", "at least 16"), (f"{TOKEN_A}", "TOKEN TENANT"),
                       (f"{TOKEN_A} acme\n{TOKEN_A} other", "already listed"), (f"{TOKEN_A} acme user extra", "got 4 fields"),
                       (f"{TOKEN_A} a$b", "bad tenant"), ("# nothing", "no tokens")]:
        with pytest.raises(TokenFileError, match=words):
            TokenTable.parse(bad, "f")
    with pytest.raises(TokenFileError, match="cannot read"):
        TokenTable.load(tmp_path / "missing")
    with pytest.raises(Unauthenticated, match="Bearer"):
        identify({"authorization": "Basic abc"}, t)
    assert identify({"authorization": f"bearer {TOKEN_A}", "x-tenant-id": "beta"}, t) == Caller("acme", "user", True)
    with pytest.raises(PermissionDenied, match="needs role 'admin'"):
        require_role(Caller("acme", "user", True), "admin")
    require_role(Caller("beta", "admin", True), "admin")
    require_role(Caller("anyone"), "admin")  # open server: no roles to check


@pytest.fixture(scope="module")
def auth_gw(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"{TOKEN_A} acme\n{TOKEN_B} beta\n{TOKEN_ADMIN} ops admin\n")
    live = LiveGateway(engine_factory(tiny_dir), http_port=0, model_name="tiny", tokens=TokenTable.load(path))
    yield live
    live.close()


def test_without_a_valid_token_every_call_is_unauthenticated(auth_gw, logs):
    for token in (None, "wrong-token-" + "x" * 10):
        with MeshClient(auth_gw.target, timeout=30, token=token) as c:
            for call in (lambda: c.complete(prompt_token_ids=[1, 2], max_tokens=2),
                         lambda: list(c.generate(prompt_token_ids=[1, 2], max_tokens=2)),
                         lambda: c.tokenize("x"), c.model_info, c.server_stats):
                with pytest.raises(MeshError) as e:
                    call()
                assert e.value.code == grpc.StatusCode.UNAUTHENTICATED, e.value
            assert c.health() == "SERVING"  # probes stay open
    with pytest.raises(grpc.RpcError) as e:  # raw bytes: the credentials are checked too
        _raw(auth_gw.target, COMPLETE, pb.GenerateRequest(prompt_token_ids=[1]).SerializeToString(), False)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    base = f"http://127.0.0.1:{auth_gw.gw.http_port}"
    for headers in ({}, {"authorization": "Bearer nope-nope-nope-nope"}, {"x-tenant-id": "acme"}):
        r = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": [1, 2], "max_tokens": 2},
                       headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert httpx.get(f"{base}/v1/models", headers=headers, timeout=30).status_code == 401
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    ok = httpx.post(f"{base}/v1/completions", json={"model": "tiny", "prompt": [1, 2], "max_tokens": 2},
                    headers={"authorization": f"Bearer {TOKEN_A}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert logs.tracebacks() == []


def test_tenant_comes_from_the_token_so_x_tenant_id_cannot_read_another_cache(auth_gw):
    prompt = list(range(3, 3 + 64))  # four full blocks: cached for the tenant that computed them
    with MeshClient(auth_gw.target, timeout=60, token=TOKEN_A) as a:
        first = a.complete(prompt_token_ids=prompt, max_tokens=2)
        again = a.complete(prompt_token_ids=prompt, max_tokens=2)
    assert first["usage"]["cached_tokens"] == 0 and again["usage"]["cached_tokens"] >= 48
    # tenant beta claims to be acme: its token decides, so it gets no hit on acme's blocks
    ch = grpc.insecure_channel(auth_gw.target)
    with MeshClient(auth_gw.target, timeout=60, channel=ch, token=TOKEN_B) as b:
        msg = b._stub.Complete(MeshClient.request(prompt_token_ids=prompt, max_tokens=2), timeout=60,
                               metadata=(("authorization", f"Bearer {TOKEN_B}"), ("x-tenant-id", "acme")))
        assert msg.usage.cached_tokens == 0
        assert b.complete(prompt_token_ids=prompt, max_tokens=2)["usage"]["cached_tokens"] >= 48  # its own now
    # the same over HTTP, on a prompt only acme has computed
    other = list(range(70, 70 + 64))

    def http(token, tenant=None):
        headers = {"authorization": f"Bearer {token}", **({"x-tenant-id": tenant} if tenant else {})}
        r = httpx.post(f"http://127.0.0.1:{auth_gw.gw.http_port}/v1/completions", timeout=60, headers=headers,
                       json={"model": "tiny", "prompt": other, "max_tokens": 2})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert http(TOKEN_A) == 0 and http(TOKEN_A) >= 48
    assert http(TOKEN_B, "acme") == 0
    with MeshClient(auth_gw.target, timeout=60, token=TOKEN_ADMIN) as ops:
        assert ops.complete(prompt_token_ids=prompt, max_tokens=2)["usage"]["cached_tokens"] == 0
    auth_gw.wait_idle()


# ---- TLS ------------------------------------------------------------------------------------------
def _certs(out: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, all signed by the
    CA; and a second, unrelated CA with its own client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem, key, cert):
        (out / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(cn, ca_key, ca_name, *, ca=False, server=False):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name or name(cn))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        elif not ca:
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = b.sign(ca_key or key, hashes.SHA256())
        return key, cert

    out.mkdir(parents=True, exist_ok=True)
    ca_key, ca = issue("mesh test CA", None, None, ca=True)
    write("ca", ca_key, ca)
    write("server", *issue("localhost", ca_key, ca.subject, server=True))
    write("client", *issue("client-1", ca_key, ca.subject))
    other_key, other = issue("other CA", None, None, ca=True)
    write("other-ca", other_key, other)
    write("other-client", *issue("intruder", other_key, other.subject))
    return {p.stem if p.suffix == ".pem" else p.stem + "-key": p for p in out.iterdir()}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return _certs(tmp_path_factory.mktemp("certs"))


def test_tls_files_are_checked_up_front(certs, tmp_path):
    assert TlsFiles.from_flags(None, None) is None
    with pytest.raises(TlsError, match="--tls-cert and --tls-key go together"):
        TlsFiles.from_flags(str(certs["server"]), None)
    with pytest.raises(TlsError, match="--tls-client-ca needs"):
        TlsFiles.from_flags(None, None, str(certs["ca"]))
    with pytest.raises(TlsError, match="--tls-cert .*missing"):
        TlsFiles.from_flags(str(tmp_path / "missing"), str(certs["server-key"]))
    with pytest.raises(TlsError, match="key"):  # a key that is not the certificate's own
        TlsFiles.from_flags(str(certs["server"]), str(certs["client-key"]))
    (tmp_path / "junk.pem").write_text("not pem")
    with pytest.raises(TlsError, match="--tls-client-ca .*not a PEM"):
        TlsFiles.from_flags(str(certs["server"]), str(certs["server-key"]), str(tmp_path / "junk.pem"))


def test_tls_and_mutual_tls(tiny_dir, certs):
    tls = TlsFiles.from_flags(str(certs["server"]), str(certs["server-key"]))
    live = LiveGateway(engine_factory(tiny_dir), tls=tls, http_port=0, model_name="tiny")
    try:
        with MeshClient(live.target, timeout=30, tls_ca=str(certs["ca"])) as c:
            assert len(c.complete(prompt_token_ids=[1, 2, 3], max_tokens=3)["token_ids"]) == 3
            assert c.health() == "SERVING"
        with MeshClient(live.target, timeout=5) as plain:  # plain text to a TLS port: no answer
            with pytest.raises(MeshError) as e:
                plain.model_info()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with MeshClient(live.target, timeout=5, tls_ca=str(certs["other-ca"])) as wrong:  # server not trusted
            with pytest.raises(MeshError) as e:
                wrong.model_info()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        r = httpx.get(f"https://127.0.0.1:{live.gw.http_port}/v1/models", verify=ssl.create_default_context(cafile=str(certs["ca"])), timeout=30)
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"
    finally:
        live.close()

    mtls = TlsFiles.from_flags(str(certs["server"]), str(certs["server-key"]), str(certs["ca"]))
    live = LiveGateway(engine_factory(tiny_dir), tls=mtls, http_port=0, model_name="tiny")
    try:
        url = f"https://127.0.0.1:{live.gw.http_port}/v1/models"
        ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        ctx.load_cert_chain(str(certs["client"]), str(certs["client-key"]))
        assert httpx.get(url, verify=ctx, timeout=30).status_code == 200
        with pytest.raises(httpx.TransportError):  # no client certificate: no handshake
            httpx.get(url, verify=ssl.create_default_context(cafile=str(certs["ca"])), timeout=30)
        with MeshClient(live.target, timeout=30, tls_ca=str(certs["ca"]), tls_cert=str(certs["client"]),
                        tls_key=str(certs["client-key"])) as c:
            assert len(c.complete(prompt_token_ids=[1, 2, 3], max_tokens=3)["token_ids"]) == 3
        for kw in ({}, dict(tls_cert=str(certs["other-client"]), tls_key=str(certs["other-client-key"]))):
            with MeshClient(live.target, timeout=5, tls_ca=str(certs["ca"]), **kw) as c:
                with pytest.raises(MeshError) as e:
                    c.model_info()
                assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        live.close()


def _mesh(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "mesh_cli", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, **(env or {})})


def test_mesh_serve_with_tls_and_tokens_and_remote_generate(tiny_dir, certs, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A} acme\n")
    (tmp_path / "token").write_text(TOKEN_A + "\n")
    bad = _mesh("serve", "--model", str(tiny_dir), "--port", "0", "--tls-cert", str(certs["server"]))
    assert bad.returncode != 0 and "--tls-cert and --tls-key go together" in bad.stderr
    bad = _mesh("serve", "--model", str(tiny_dir), "--port", "0", "--auth-tokens-file", str(tmp_path / "none"))
    assert bad.returncode != 0 and "--auth-tokens-file" in bad.stderr and "cannot read" in bad.stderr
    bad = _mesh("generate", "--model", str(tiny_dir), "--prompt-ids", "1,2", "--tls-ca", str(certs["ca"]))
    assert bad.returncode != 0 and "--tls-ca: connection flags need --target" in bad.stderr

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_file = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mesh_cli", "serve", "--model", str(tiny_dir), "--port", str(port),
                             "--dtype", "float32", "--tls-cert", str(certs["server"]), "--tls-key",
                             str(certs["server-key"]), "--tls-client-ca", str(certs["ca"]),
                             "--auth-tokens-file", str(tokens)],
                            # a file, not a pipe: the load test's access lines would fill a pipe nobody reads
                            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    target = f"127.0.0.1:{port}"
    try:
        with MeshClient(target, tls_ca=str(certs["ca"]), tls_cert=str(certs["client"]),
                        tls_key=str(certs["client-key"])) as c:
            c.wait_ready(120)
        conn = ["--target", target, "--tls-ca", str(certs["ca"]), "--tls-cert", str(certs["client"]),
                "--tls-key", str(certs["client-key"])]
        out = _mesh("generate", *conn, "--prompt-ids", "1,2,3", "--max-tokens", "3", "--json",
                    "--token-file", str(tmp_path / "token"))
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["token_ids"]) == 3
        out = _mesh("generate", *conn, "--prompt-ids", "1,2,3", "--max-tokens", "3")
        assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
        out = _mesh("generate", *conn, "--prompt-ids", "1,2,3", "--max-tokens", "3", env={"MESH_API_TOKEN": TOKEN_A})
        assert out.returncode == 0, out.stderr
        # the load generator over the same TLS, with and without the token
        lt = ["loadtest", *conn, "--concurrency", "2", "--duration", "2", "--prompt-tokens", "8", "--output-tokens",
              "4", "--no-plots", "--no-progress", "--json", "--timeout", "30"]
        out = _mesh(*lt, "--out", str(tmp_path / "lt"), "--token-file", str(tmp_path / "token"), timeout=120)
        assert out.returncode == 0, out.stderr
        run = json.loads(out.stdout.splitlines()[0])
        assert run["requests"]["completed"] > 0 and run["requests"]["failed"] == 0, run["requests"]
        out = _mesh(*lt, "--out", str(tmp_path / "lt2"), timeout=120)
        assert out.returncode != 0 and "UNAUTHENTICATED" in out.stderr and "Traceback" not in out.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log_file.close()
    log = (tmp_path / "serve.log").read_text()
    assert proc.returncode == 0, log
    assert "TLS with certificate" in log and "client certificates required" in log
    assert "bearer tokens required (1 tokens" in log and "Traceback" not in log


def test_open_server_says_so_in_its_log(tiny_dir, logs):
    live = LiveGateway(engine_factory(tiny_dir))
    live.close()
    text = "\n".join(r.getMessage() for r in logs.records)
    assert "NO AUTHENTICATION: anyone who reaches these ports may call" in text
    assert "NO TLS: traffic on these ports is plain text" in text


# ---- Redis over TLS -------------------------------------------------------------------------------
@pytest.fixture
def redis_tls(certs, tmp_path):
    """A redis-server that speaks only TLS and requires client certificates signed by the test CA."""
    import socket
    import redis
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(certs["server"]), "--tls-key-file", str(certs["server-key"]),
                             "--tls-ca-cert-file", str(certs["ca"]), "--tls-auth-clients", "yes",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = (f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs['ca']}&ssl_certfile={certs['client']}"
           f"&ssl_keyfile={certs['client-key']}")
    deadline = time.monotonic() + 30
    while True:
        try:
            if redis.Redis.from_url(url, socket_timeout=2).ping():
                break
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"redis-server with TLS did not start: {proc.communicate()[0]}")
            time.sleep(0.1)
    yield url, port
    proc.terminate()
    proc.wait(10)


def test_prefix_cache_over_redis_tls(tiny_dir, redis_tls, certs):
    from mesh.config import EngineConfig
    from mesh.engine.engine import Engine
    from mesh.types import SamplingParams
    from router_service.redis_tier import RedisTier
    url, port = redis_tls
    prompt = list(range(3, 90))  # five full blocks of 16

    def run(tier):
        engine = Engine(tiny_dir, EngineConfig(dtype="float32"), prefix_tier=tier)
        req = engine.make_request(prompt_token_ids=prompt,
                                  sampling=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        out = engine.generate([req])[0]
        assert engine.prefix_cache.flush()
        return out

    first = run(RedisTier(url, timeout_s=5))
    tier = RedisTier(url, timeout_s=5)
    second = run(tier)  # a second gateway: its local pool is empty, Redis (over TLS) has the blocks
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens == 80
    assert second.token_ids == first.token_ids and tier.stats.hits == 5
    # plain text, an unknown server CA, no client certificate: Redis is unusable, a miss and no error
    for bad in (f"redis://127.0.0.1:{port}/0", url.replace(str(certs["ca"]), str(certs["other-ca"])),
                f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={certs['ca']}"):
        t = RedisTier(bad, timeout_s=2)
        assert not t.ping()
        out = run(t)
        assert out.usage.cached_tokens == 0 and out.token_ids == first.token_ids


def test_authorize_for_other_services(auth_gw):
    """`authorize` as an administrative gRPC method would call it, on a real server."""
    from router_service.server import authorize

    async def admin_only(request, context):
        caller = await authorize(context, auth_gw.gw, role="admin")
        return f"{caller.tenant}:{caller.role}".encode()

    async def start():
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(admin_only, request_deserializer=lambda b: b,
                                                      response_serializer=lambda b: b)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Admin", {"Do": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = auth_gw.call(start())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/test.Admin/Do", request_serializer=lambda b: b, response_deserializer=lambda b: b)
            assert call(b"", metadata=(("authorization", f"Bearer {TOKEN_ADMIN}"),), timeout=10) == b"ops:admin"
            for metadata, code in [((("authorization", f"Bearer {TOKEN_A}"),), grpc.StatusCode.PERMISSION_DENIED),
                                   ((), grpc.StatusCode.UNAUTHENTICATED)]:
                with pytest.raises(grpc.RpcError) as e:
                    call(b"", metadata=metadata, timeout=10)
                assert e.value.code() == code, e.value
    finally:
        auth_gw.call(server.stop(0))


def test_openai_client_with_a_token(auth_gw):
    import openai
    base = f"http://127.0.0.1:{auth_gw.gw.http_port}/v1"
    ok = openai.OpenAI(base_url=base, api_key=TOKEN_A, max_retries=0, timeout=30)
    out = ok.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2)
    assert out.usage.completion_tokens == 2
    assert [m.id for m in ok.models.list()] == ["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="not-a-token-at-all", max_retries=0, timeout=30).completions.create(
            model="tiny", prompt=[1, 2, 3], max_tokens=2)
