"""A local run's Ray instance: loopback where Ray allows it, and a client without the token is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, grpc, psutil, socket, ray
    from replab.platform.train.ray_train import ensure_ray
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    from ray._raylet import AuthenticationTokenLoader

    ensure_ray(1)
    ctx = ray.get_runtime_context()
    port = int(ctx.gcs_address.rsplit(":", 1)[1])
    hosts = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family == socket.AF_INET and not a.address.startswith("127.")]

    def call(host, metadata):
        with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.enable_http_proxy", 0)]) as channel:
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            try:
                stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), metadata=metadata, timeout=10)
                return "OK"
            except grpc.RpcError as exc:
                return exc.code().name

    family = [psutil.Process()] + psutil.Process().children(recursive=True)
    pids = {p.pid: p.name() for p in family}
    listening = sorted({(pids[c.pid], c.laddr.ip) for c in psutil.net_connections("tcp")
                        if c.status == "LISTEN" and c.pid in pids})
    token = tuple(AuthenticationTokenLoader.instance().get_token_for_http_header().items())
    print(json.dumps({
        "node_ip": ray.util.get_node_ip_address(), "gcs": ctx.gcs_address,
        "dashboard": ray._private.worker._global_node.address_info.get("webui_url"),
        "host": hosts[0] if hosts else None,
        "without_token": call(hosts[0], ()) if hosts else None,
        "wrong_token": call(hosts[0], (("authorization", "Bearer " + "0" * 32),)) if hosts else None,
        "with_token": call(hosts[0], token) if hosts else None,
        "loopback_without_token": call("127.0.0.1", ()),
        "loopback_with_token": call("127.0.0.1", token),
        "listening": listening,
    }))
    ray.shutdown()
""")


@pytest.mark.ray
@pytest.mark.slow
def test_local_ray_refuses_a_client_without_the_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["node_ip"] == "127.0.0.1" and seen["gcs"].startswith("127.0.0.1:")
    assert seen["dashboard"] is None or seen["dashboard"].startswith("127.0.0.1:")
    # Every server of the instance (GCS, raylet, workers, agents, dashboard) listens on loopback only ...
    exposed = [(name, ip) for name, ip in seen["listening"] if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert seen["listening"] and not exposed, f"listening beyond loopback: {exposed}"
    # ... and on loopback the token is still required (another local user has no token).
    assert seen["loopback_with_token"] == "OK"
    assert seen["loopback_without_token"] == "UNAUTHENTICATED"
    if seen["host"] is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    # From the host's own network address, with or without a token, the GCS cannot be reached.
    for key in ("without_token", "wrong_token", "with_token"):
        assert seen[key] in ("UNAVAILABLE", "UNAUTHENTICATED"), (key, seen[key])


def test_local_run_refuses_disabled_auth(monkeypatch):
    from replab.config import ConfigError
    from replab.platform.train.ray_train import local_ray_kwargs

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConfigError, match="keeps Ray's token authentication on"):
        local_ray_kwargs()
