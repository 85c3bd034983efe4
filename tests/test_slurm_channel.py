"""The channel of a pool whose ranks run on Slurm hosts: it listens only on the address the nodes
reach, a stranger on a node gets nothing unpickled, and the key is nowhere Slurm or ps shows."""
from __future__ import annotations

import base64
import subprocess
import sys
import textwrap
from typing import Iterator

import psutil
import pytest

from support import slurm_bed

pytestmark = pytest.mark.skipif(slurm_bed.why_no_bed() is not None, reason=slurm_bed.why_no_bed() or "")

STRANGER = textwrap.dedent('''
    import os, pickle, socket, ssl, struct, subprocess, sys, tempfile
    host, port, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    class Boom:
        def __reduce__(self):
            return (open, (marker, "w"))  # unpickling it anywhere creates the marker file

    payload = pickle.dumps(Boom())
    framed = struct.pack("!i", len(payload)) + payload  # multiprocessing.connection's framing
    results = {}

    # 1. plain TCP, straight to the pickles
    s = socket.create_connection((host, port), timeout=5)
    try:
        s.sendall(framed + framed)
        results["plain"] = s.recv(100)
    except OSError as e:
        results["plain"] = repr(e)
    s.close()

    # 2. TLS without a client certificate; 3. TLS with a certificate of our own
    folder = tempfile.mkdtemp()
    key, cert = os.path.join(folder, "k"), os.path.join(folder, "c")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=stranger"], capture_output=True, check=True)
    for name, own in (("tls-anonymous", False), ("tls-own-cert", True)):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if own:
            context.load_cert_chain(cert, key)
        try:
            t = context.wrap_socket(socket.create_connection((host, port), timeout=5))
            t.sendall(struct.pack("!i", 0) + framed)
            results[name] = t.recv(100)
        except (OSError, ssl.SSLError) as e:
            results[name] = repr(e)
    print(repr(results))
''')


@pytest.fixture
def slurm_pool() -> Iterator[object]:
    from notebook_fabric.clusters.slurm_hosts import SlurmHosts
    from notebook_fabric.clusters.spec import Slurm
    from notebook_fabric.fabric import build_rank_fabric
    from notebook_fabric.launching.pool import RankPool

    slurm_bed.bring_up()
    hosts = SlurmHosts(Slurm(), num_nodes=2, devices=1)
    try:
        pool = RankPool({"accelerator": "cpu", "strategy": "ddp", "devices": 1, "num_nodes": 2}, 2,
                        make_fabric=build_rank_fabric, start_method="spawn", hosts=hosts)
        try:
            pool.start(timeout=120)
            yield pool
        finally:
            pool.stop()
    finally:
        hosts.close()  # also when the pool could not be built: the allocation is given back
    slurm_bed.assert_no_jobs()
    slurm_bed.assert_nodes_empty()


FRIEND = textwrap.dedent('''
    import pickle, sys
    from notebook_fabric.clusters.tls import LoopbackTunnel, PoolCertificate
    from notebook_fabric.live.channel import connect_to_notebook
    address, certificate, key, authkey = pickle.load(sys.stdin.buffer)
    tunnel = LoopbackTunnel(address, PoolCertificate(certificate, key), rank=0).serve()
    connection = connect_to_notebook(tunnel.address, authkey)
    connection.send({"from": "a rank", "ok": True})
    connection.close()
    tunnel.finish()
''')


def _on_node(node: str, code: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", f"--net=/run/netns/{node}", sys.executable, "-c", code, *args], input=stdin,
                          capture_output=True, timeout=60)


def test_a_stranger_on_a_node_gets_nothing_unpickled_and_a_rank_gets_through(tmp_path) -> None:
    import pickle

    from notebook_fabric.clusters.remote_channel import TLSChannel
    from notebook_fabric.clusters.tls import PoolCertificate

    slurm_bed.bring_up()
    certificate = PoolCertificate.create()
    channel = TLSChannel(slurm_bed.LOGIN_ADDRESS, certificate).start()
    try:
        host, port = channel.address
        marker = tmp_path / "unpickled"
        out = _on_node("nfnode2", STRANGER, host, str(port), str(marker))
        assert out.returncode == 0, out.stderr.decode()
        results = eval(out.stdout.decode().strip())  # noqa: S307 - our own script's repr of a dict
        assert results["plain"] == b"" or "Error" in str(results["plain"]), results
        for name in ("tls-anonymous", "tls-own-cert"):
            assert isinstance(results[name], str) or results[name] == b"", results  # refused, never answered
        assert not marker.exists()  # nothing was unpickled
        assert channel.door.refused == 3
        assert channel.refused == 0  # no stranger even reached the HMAC challenge behind the door
        parcel = pickle.dumps((channel.address, certificate.certificate, certificate.key, channel.authkey))
        friend = _on_node("nfnode1", FRIEND, stdin=parcel)
        assert friend.returncode == 0, friend.stderr.decode()
        connection = channel.accept()
        assert connection.recv() == {"from": "a rank", "ok": True}
        connection.close()
    finally:
        channel.close()


def test_the_pool_listens_only_toward_the_nodes_and_closes_its_door_once_started(slurm_pool) -> None:
    pool = slurm_pool
    host, port = pool._listener.address
    assert host == slurm_bed.LOGIN_ADDRESS and pool._rendezvous.host == slurm_bed.LOGIN_ADDRESS
    probe = _on_node("nfnode2", "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)",
                     host, str(port))
    assert b"ConnectionRefusedError" in probe.stderr  # every rank is in: the door is shut
    assert pool.run(lambda fabric, namespace: __import__("socket").gethostname()) == {0: "nfnode1", 1: "nfnode2"}


def test_the_key_is_not_in_slurm_or_in_a_command_line(slurm_pool) -> None:
    pool = slurm_pool
    secrets = [pool._listener.authkey.hex(), base64.b64encode(pool._listener.authkey).decode()]
    key_pem = pool.hosts._certificate.key.decode()
    secrets.append("".join(key_pem.strip().splitlines()[1:-1])[:40])
    job = pool.hosts.allocation.job_id
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    shown += subprocess.run(["scontrol", "show", "step", f"{job}"], capture_output=True, text=True).stdout
    shown += subprocess.run(["squeue", "-o", "%all"], capture_output=True, text=True).stdout
    shown += subprocess.run(["squeue", "-s", "-o", "%all"], capture_output=True, text=True).stdout
    for process in psutil.process_iter():
        try:
            shown += " ".join(process.cmdline()) + "\n" + repr(process.environ()) + "\n"
        except psutil.Error:
            continue
    assert job in shown
    for secret in secrets:
        assert secret not in shown
