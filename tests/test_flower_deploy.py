"""Flower deployment on 127.0.0.1: certificates, the TLS probe, process clean-up, and a real loopback run.

The tests marked ``deploy`` start a SuperLink and SuperNodes (TLS, SuperNode authentication) and
run in the default ``pytest``; every process they start is stopped, which the tests check.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from fedsp.errors import FedSPError
from fedsp.runtime.flower.loopback import Loopback, free_port
from fedsp.runtime.flower.pki import (
    Certificates,
    check_certificates,
    make_certificates,
    make_node_key,
    probe_superlink,
)
from fedsp.runtime.flower.processes import Processes, error_lines

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "flower_loopback.py"


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


def _with_home(home: Path) -> list[psutil.Process]:
    """Live processes whose FLWR_HOME is ``home`` (what a deployment in that folder started)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get("FLWR_HOME") == str(home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- certificates and keys (no processes) ----


def test_generated_certificates_check_and_name_the_loopback_host(tmp_path):
    certs = make_certificates(tmp_path / "tls")
    checked = check_certificates(certs)
    assert checked.ca == certs.ca.resolve() and checked.server_key.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FedSPError, match=r"not valid for 10\.1\.2\.3") as err:
        check_certificates(certs, host="10.1.2.3")
    assert "127.0.0.1" in _one_line(err)


def test_wrong_or_missing_certificates_are_one_line_errors(tmp_path):
    ours, theirs = make_certificates(tmp_path / "a"), make_certificates(tmp_path / "b")
    cases = {
        "does not exist": Certificates(tmp_path / "none.crt", ours.server_cert, ours.server_key),
        "not signed by the CA": Certificates(theirs.ca, ours.server_cert, ours.server_key),
        "does not belong to the certificate": Certificates(ours.ca, ours.server_cert, theirs.server_key),
    }
    for expected, certs in cases.items():
        with pytest.raises(FedSPError, match=expected) as err:
            check_certificates(certs)
        _one_line(err)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(FedSPError, match="is not a PEM server certificate") as err:
        check_certificates(Certificates(ours.ca, garbage, ours.server_key))
    _one_line(err)


def test_node_keys_are_openssh_p384_pairs(tmp_path):
    private, public = make_node_key(tmp_path, "node-0")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert private.stat().st_mode & 0o777 == 0o600


# ---- the TLS probe a deployment runs before the SuperNodes and flwr connect ----


def _server(tls: Certificates | None) -> tuple[str, socket.socket]:
    """A one-thread server on 127.0.0.1: TLS with ``tls``'s certificate, or plain HTTP when None."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    context = None
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.server_cert, tls.server_key)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                if context is None:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                else:
                    context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}", listener


def test_probe_names_unreachable_superlinks_wrong_cas_and_plain_servers(tmp_path):
    ours, theirs = make_certificates(tmp_path / "a"), make_certificates(tmp_path / "b")
    with pytest.raises(FedSPError, match="cannot reach the SuperLink at 127.0.0.1:") as err:
        probe_superlink(f"127.0.0.1:{free_port()}", ours.ca)
    assert "is flower-superlink running there?" in _one_line(err)
    with pytest.raises(FedSPError, match="does not exist"):
        probe_superlink("127.0.0.1:9092", tmp_path / "missing.crt")
    tls_address, tls_server = _server(ours)
    plain_address, plain_server = _server(None)
    try:
        probe_superlink(tls_address, ours.ca)  # the right CA: no error
        with pytest.raises(FedSPError, match="does not accept") as err:
            probe_superlink(tls_address, theirs.ca)
        assert "wrong CA certificate" in _one_line(err)
        with pytest.raises(FedSPError, match="did not complete a TLS handshake") as err:
            probe_superlink(plain_address, ours.ca)
        assert "--insecure" in _one_line(err)
    finally:
        tls_server.close()
        plain_server.close()


# ---- processes ----

GRANDPARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
time.sleep(300)
"""


def test_stop_ends_started_processes_and_their_detached_children(tmp_path):
    procs = Processes(dict(os.environ), tmp_path / "logs")
    started = procs.start("parent", [sys.executable, "-c", GRANDPARENT])
    deadline = time.monotonic() + 30
    while len(procs.alive()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    family = procs.alive()
    assert len(family) == 2 and started.pid in {p.pid for p in family}
    stopped = procs.stop(grace_s=5)
    assert sorted(p.pid for p in family) == stopped
    assert procs.alive() == [] and started.poll() is not None
    assert not any(_running(p.pid) for p in family)


def test_error_lines_pick_flowers_error_block(tmp_path):
    log = tmp_path / "supernode.log"
    log.write_text(
        "\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode\n"
        "WARNING :   Connection attempt failed, retrying in 2.21 seconds\n"
        "ERROR :     SSL/TLS handshake error detected.\nERROR :     Exit Code: 305\n"
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed\n"
        "For more information, visit: <https://flower.ai/docs>\nINFO:     Shutting down\n"
    )
    assert error_lines(log) == (
        "SSL/TLS handshake error detected. | Exit Code: 305 | "
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )


def test_script_refuses_certificates_that_do_not_match_in_one_line(tmp_path):
    ours, theirs = make_certificates(tmp_path / "a"), make_certificates(tmp_path / "b")
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--work",
            str(tmp_path / "work"),
            "--ca-cert",
            str(theirs.ca),
            "--server-cert",
            str(ours.server_cert),
            "--server-key",
            str(ours.server_key),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("flower_loopback: error: server certificate")
    assert "not signed by the CA" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "work" / "logs").exists()  # refused before any process started


def test_a_clientapp_process_imports_neither_torch_nor_transformers():
    """Every message starts a fresh ``flwr-clientapp`` that imports the ClientApp and hands the job to
    the node's warm worker: importing torch and transformers there (seconds each, three nodes on two
    cores) made each deployed SFPrompt round several times slower."""
    probe = (
        "import sys, fedsp.runtime.flower.client_app, fedsp.runtime.flower.secagg, fedsp.config;"
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


# ---- real deployments on 127.0.0.1 ----


@pytest.mark.deploy
def test_unregistered_node_key_is_refused_in_one_line(tmp_path):
    with Loopback(tmp_path / "work", nodes=2, timeout_s=120, connect_s=60) as deployment:
        deployment.start_superlink()
        assert set(deployment.register([0])) == {0}
        with pytest.raises(FedSPError, match="SuperNode 1 could not join .*refused its key") as err:
            deployment.start_supernodes()
        assert "Failed to activate SuperNode" in _one_line(err)
        other = make_certificates(tmp_path / "other")  # the real SuperLink, checked against another CA
        with pytest.raises(FedSPError, match="does not accept"):
            probe_superlink(deployment.address, other.ca)
    assert deployment.processes.alive() == []
    assert all(proc.poll() is not None for proc in deployment.processes.started.values())


@pytest.mark.deploy
@pytest.mark.parametrize("method", ["fedsp", "sfprompt"])
def test_loopback_deployment_with_tls_and_node_auth_runs_two_rounds_and_stops_everything(
    method, tmp_path, arc_rows
):
    """SuperLink + 3 SuperNodes (own keys, partitions and data folders), tiny model, 2 rounds; SFPrompt's
    split steps go back and forth between the server and the nodes as messages."""
    owners = []
    for k in range(3):
        owners.append(tmp_path / f"owner{k}")
        owners[-1].mkdir()
        (owners[-1] / "train.jsonl").write_text(arc_rows(6 + k, start=10 * k))
    work, out = tmp_path / "work", tmp_path / "out"
    argv = [sys.executable, str(SCRIPT), "--work", str(work), "--out", str(out), "--json", "--timeout", "200"]
    argv += ["--method", method]
    for owner in owners:
        argv += ["--data-dir", str(owner)]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        stdout, stderr = proc.communicate(timeout=260)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops its deployment on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["rounds"] == 2 and result["replies"] == [3, 3]
    summary = json.loads((out / "results.json").read_text())
    assert 0.0 <= summary["final"]["acc"] <= 1.0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert [m["sampled_clients"] for m in metrics] == [[0, 1, 2], [0, 1, 2]]
    assert all(m["failed_clients"] == [] for m in metrics)
    for k in range(3):  # each data owner's client state on its own disk, under its own partition
        assert list((work / "nodes" / f"node-{k}").glob(f"*/partition-{k}")), f"node {k} kept no state"
    assert "Successfully started run" in (work / "logs" / "flwr-run.log").read_text()
    assert summary["method"] == method
    if method == "sfprompt":  # each round: a train message, then the split step's two turns
        node_log = (work / "logs" / "supernode-0.log").read_text()
        assert node_log.count("Receiving: train.split message") == 2 * 2
        assert summary["comm"]["split_bytes_total"] > 0
    assert _with_home((work / "home").resolve()) == []  # every process the script started is gone
    assert result["stopped_pids"] and not any(_running(pid) for pid in result["stopped_pids"])
    print(f"loopback deployment: wall {wall:.1f} s, seconds per round {result['seconds_per_round']}")
