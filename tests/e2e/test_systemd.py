"""systemd: the console scripts speak Type=notify, and configs/systemd/ says what the daemons do.

The daemons' tests stand in for systemd: they bind a unix datagram socket, name it in
``NOTIFY_SOCKET`` and read the sender's pid from the kernel (SO_PASSCRED), as systemd does to
honour ``NotifyAccess=main``. The unit files are read with systemd's syntax, checked against
the programs, and given to ``systemd-analyze verify`` and ``systemctl --root`` where those are
installed. Nothing here needs a running systemd.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import pytest

from helpers import BIN, script, wait_for
from hq import config, options
from hq.client import create_client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

UNITS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "systemd"
BROKER_UNIT, WORKER_UNIT, TARGET = "hq-broker.service", "hq-worker@.service", "hq.target"
GATEWAY_UNIT = "hq-gateway.service"
SERVICES = {BROKER_UNIT: "hq-broker", WORKER_UNIT: "hq-worker", GATEWAY_UNIT: "hq-gateway"}
VENV_BIN = "/opt/hq/venv/bin"  # where the units expect the console scripts
NO_SYSTEMD = "needs {tool} on the PATH (Debian and Ubuntu: the systemd package, apt-get install systemd)"


# --- a stand-in for systemd's notification socket ---------------------------------------------


class NotifySocket:
    """Records every datagram as (sender pid, [lines])."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="hq-sd-")  # AF_UNIX paths hold ~107 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.messages: list = []

    def receive(self, timeout: float):
        """One datagram as (pid, lines), or None when none came within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except (socket.timeout, BlockingIOError):
            return None
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
        message = (pid, data.decode().split("\n"))
        self.messages.append(message)
        return message

    def expect(self, state: str, proc: subprocess.Popen, log, timeout: float = 20.0) -> dict:
        """The first datagram with the line ``state`` (fields by name); fail if ``proc`` exits
        or the deadline passes first. A datagram sent just before an exit is still read."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            message = self.receive(0.1)
            if message is None:
                if proc.poll() is not None:
                    raise AssertionError(f"exited {proc.returncode} without {state}:\n{log()}")
                continue
            pid, lines = message
            if state in lines:
                assert pid == proc.pid, f"{state} came from pid {pid}, not the main process {proc.pid}"
                return dict(line.split("=", 1) for line in lines if "=" in line)
        raise AssertionError(f"no {state} within {timeout} s; got {self.messages}\n{log()}")

    def states(self) -> list:
        """Every line received, in order, without the STATUS text."""
        return [line for _, lines in self.messages for line in lines if not line.startswith("STATUS=")]

    def senders(self) -> set:
        return {pid for pid, _ in self.messages}

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.fixture
def run_dir():
    """A short directory for ipc:// endpoints (AF_UNIX path limit)."""
    path = tempfile.mkdtemp(prefix="hq-sd-run-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Daemons:
    """Console scripts started for one test, each logging to a file; killed if left running."""

    def __init__(self, tmp_path: pathlib.Path):
        self.tmp_path = tmp_path
        self.procs: list = []

    def start(self, name: str, *args, notify: NotifySocket | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("HQ_") and k != "NOTIFY_SOCKET"}
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify.path
        log_path = self.tmp_path / f"{name}-{len(self.procs)}.log"
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([script(name), *args], stdout=log_file, stderr=subprocess.STDOUT, env=env)
        self.procs.append(proc)
        return proc, lambda: log_path.read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@pytest.fixture
def daemons(tmp_path):
    d = Daemons(tmp_path)
    yield d
    d.stop_all()


def sigterm(proc: subprocess.Popen, notify: NotifySocket, log) -> float:
    """SIGTERM ``proc``: STOPPING=1 must come from it, then exit 0. Returns the seconds taken."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    notify.expect("STOPPING=1", proc, log)  # its pid, read from the kernel: sent before the exit
    assert proc.wait(timeout=30) == 0, log()
    return time.monotonic() - started


def broker_address(status: str) -> str:
    match = re.search(r"tcp://127\.0\.0\.1:\d+", status)
    assert match, f"STATUS= names no client endpoint: {status!r}"
    return match.group(0)


def stop_timeout_s(unit: str) -> float:
    return float(value(read_unit(unit), "Service", "TimeoutStopSec"))


# --- the daemons --------------------------------------------------------------------------------


def test_broker_is_ready_once_it_answers_and_says_stopping_before_it_exits(daemons, notify_socket, run_dir):
    backend = f"ipc://{run_dir}/backend.ipc"
    endpoint_file = os.path.join(run_dir, "endpoints")
    proc, log = daemons.start(
        "hq-broker",
        "--bind",
        "tcp://127.0.0.1:*",
        "--backend",
        backend,
        "--endpoint-file",
        endpoint_file,
        notify=notify_socket,
    )
    fields = notify_socket.expect("READY=1", proc, log)
    address = broker_address(fields["STATUS"])
    assert backend in fields["STATUS"]
    # At READY=1 the broker already answers, and the endpoint file already names it.
    with create_client(address, timeout=5) as client:
        assert client.get_stats()["workers"] == []
    with open(endpoint_file) as fh:
        assert fh.read().split() == [address]
    assert sigterm(proc, notify_socket, log) < stop_timeout_s(BROKER_UNIT)
    assert notify_socket.states() == ["READY=1", "STOPPING=1"]
    assert not os.path.exists(endpoint_file)


def test_worker_is_ready_once_connected_and_says_stopping_before_it_exits(
    daemons, notify_socket, run_dir, tmp_path
):
    backend = f"ipc://{run_dir}/backend.ipc"
    endpoint_file = os.path.join(run_dir, "endpoints")
    broker, broker_log = daemons.start(
        "hq-broker", "--bind", "tcp://127.0.0.1:*", "--backend", backend, "--endpoint-file", endpoint_file
    )
    wait_for(lambda: os.path.exists(endpoint_file) or broker.poll() is not None, 20, what="the broker")
    assert broker.poll() is None, broker_log()
    with open(endpoint_file) as fh:
        address = fh.read().split()[0]
    db = tmp_path / "hq.db"
    proc, log = daemons.start(
        "hq-worker", "--backend", backend, "--db", str(db), "--name", "hq-worker-7", notify=notify_socket
    )
    fields = notify_socket.expect("READY=1", proc, log)
    assert db.exists() and "hq-worker-7" in fields["STATUS"] and backend in fields["STATUS"]
    with create_client(address, timeout=5) as client:
        # READY=1 cannot wait for the broker (it never acknowledges a worker): registration follows.
        def names():
            return [w["name"] for w in client.get_stats()["workers"]]

        wait_for(lambda: names() == ["hq-worker-7"], 10, what="the worker to register")
        assert sigterm(proc, notify_socket, log) < stop_timeout_s(WORKER_UNIT)
        wait_for(lambda: names() == [], 10, what="the broker to see the worker leave")
    assert notify_socket.states() == ["READY=1", "STOPPING=1"]
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=30) == 0, broker_log()


def test_worker_is_ready_without_a_broker(daemons, notify_socket, run_dir, tmp_path):
    """A worker started while its broker is down (After= orders, Wants= does not bind) is up:
    it registers whenever the broker comes."""
    proc, log = daemons.start(
        "hq-worker",
        "--backend",
        f"ipc://{run_dir}/backend.ipc",
        "--db",
        str(tmp_path / "hq.db"),
        notify=notify_socket,
    )
    notify_socket.expect("READY=1", proc, log)
    sigterm(proc, notify_socket, log)


def test_server_is_ready_with_its_workers_and_its_children_never_notify(daemons, notify_socket, tmp_path):
    proc, log = daemons.start(
        "hq-server",
        "--bind",
        "tcp://127.0.0.1:*",
        "--db",
        str(tmp_path / "hq.db"),
        "--workers",
        "2",
        "--heartbeat-interval",
        "0.2",
        notify=notify_socket,
    )
    fields = notify_socket.expect("READY=1", proc, log)
    assert fields["STATUS"].startswith("hq ready on tcp://")
    with create_client(broker_address(fields["STATUS"]), timeout=5) as client:
        assert len(client.get_stats()["workers"]) == 2
    sigterm(proc, notify_socket, log)
    # hq-server speaks for the stack: its broker and workers never saw NOTIFY_SOCKET.
    assert notify_socket.senders() == {proc.pid}
    assert notify_socket.states() == ["READY=1", "STOPPING=1"]


def test_gateway_is_ready_once_it_listens_and_says_stopping_before_it_exits(daemons, notify_socket, run_dir):
    sock = f"unix://{run_dir}/hashserv.sock"
    endpoint_file = os.path.join(run_dir, "gateway.endpoints")
    args = ["--listen", sock, "--listen", "127.0.0.1:0", "--endpoint-file", endpoint_file]
    proc, log = daemons.start("hq-gateway", "--broker", "tcp://127.0.0.1:1", *args, notify=notify_socket)
    fields = notify_socket.expect("READY=1", proc, log)
    assert sock in fields["STATUS"] and "tcp://127.0.0.1:1" in fields["STATUS"]
    # At READY=1 it accepts, and anyone may connect to its unix socket (the directory decides).
    assert os.stat(sock[len("unix://") :]).st_mode & 0o777 == 0o666
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(sock[len("unix://") :])
    assert sigterm(proc, notify_socket, log) < stop_timeout_s(GATEWAY_UNIT)
    assert notify_socket.states() == ["READY=1", "STOPPING=1"]
    assert not os.path.exists(endpoint_file)


@pytest.mark.parametrize(
    "name,mistake",
    [
        ("hq-broker", "port in use"),
        ("hq-broker", "no such directory"),
        ("hq-worker", "no such directory"),
        ("hq-gateway", "no such directory"),
    ],
)
def test_configuration_error_exits_2_without_ready(name, mistake, daemons, notify_socket, run_dir):
    """What RestartPreventExitStatus=2 relies on: a configuration error is exit status 2,
    before READY=1."""
    missing = os.path.join(run_dir, "no", "such", "dir")
    backend = ["--backend", f"ipc://{run_dir}/backend.ipc"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if mistake == "port in use":
            args = ["--bind", f"tcp://127.0.0.1:{taken.getsockname()[1]}", *backend]
        elif name == "hq-broker":
            args = ["--bind", f"ipc://{missing}/clients.ipc", *backend]
        elif name == "hq-gateway":
            args = ["--listen", f"unix://{missing}/hashserv.sock"]
        else:
            args = ["--db", os.path.join(missing, "hq.db"), *backend]
        proc, log = daemons.start(name, *args, notify=notify_socket)
        assert proc.wait(timeout=30) == 2, log()
    assert notify_socket.receive(0) is None  # anything sent before the exit would be queued


# --- the unit files, as systemd reads them ------------------------------------------------------


def read_unit(name: str) -> dict:
    """{section: {key: [each assignment's value]}} in systemd's syntax: ``#`` and ``;`` start
    comment lines, a trailing backslash continues a line, and a key may be assigned again
    (list settings accumulate; an empty assignment resets the list)."""
    sections: dict = {}
    section = None
    logical = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = sections.setdefault(line[1:-1], {})
            continue
        assert section is not None and "=" in line, f"{name}: not a unit file line: {raw!r}"
        key, _, val = line.partition("=")
        values = section.setdefault(key.strip(), [])
        if val.strip():
            values.append(val.strip())
        else:
            values.clear()
            values.append("")
    return sections


def value(unit: dict, section: str, key: str) -> str:
    """A single-valued setting (the last assignment wins, as in systemd)."""
    assert key in unit.get(section, {}), f"[{section}] has no {key}="
    return unit[section][key][-1]


def words(unit: dict, section: str, key: str) -> list:
    """A list setting (After=, Wants=, ...), every assignment's words together."""
    return [word for val in unit.get(section, {}).get(key, []) for word in val.split()]


@pytest.mark.parametrize("unit_name", sorted(SERVICES))
def test_services_notify_and_stop_restarting_on_configuration_errors(unit_name):
    unit = read_unit(unit_name)
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "NotifyAccess") == "main"
    assert value(unit, "Service", "Restart") == "on-failure"
    assert "2" in words(unit, "Service", "RestartPreventExitStatus")
    # The start limit lives in [Unit] (systemd >= 230 ignores it in [Service]).
    assert int(value(unit, "Unit", "StartLimitIntervalSec")) > 0
    assert int(value(unit, "Unit", "StartLimitBurst")) > 1
    assert value(unit, "Service", "KillSignal") == "SIGTERM"
    # The daemons' clean stop: the tests above measure it against this.
    assert float(value(unit, "Service", "TimeoutStopSec")) >= 10
    assert value(unit, "Service", "EnvironmentFile") == "/etc/hq/hq.env"


@pytest.mark.parametrize("unit_name", sorted(SERVICES))
def test_services_are_hardened(unit_name):
    unit = read_unit(unit_name)
    expected = {
        "User": "hq",
        "Group": "hq",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
    }
    assert {key: value(unit, "Service", key) for key in expected} == expected


def test_broker_owns_the_runtime_directory_and_workers_the_state_directory():
    broker, worker = read_unit(BROKER_UNIT), read_unit(WORKER_UNIT)
    assert value(broker, "Service", "RuntimeDirectory") == "hq"
    assert value(worker, "Service", "StateDirectory") == "hq"
    # systemd removes a RuntimeDirectory= when its unit stops: on a worker, one worker
    # stopping would delete the broker's sockets.
    assert "RuntimeDirectory" not in worker["Service"]


def test_workers_start_after_the_broker_but_do_not_die_with_it():
    worker = read_unit(WORKER_UNIT)
    assert BROKER_UNIT in words(worker, "Unit", "After")
    assert BROKER_UNIT in words(worker, "Unit", "Wants")
    for binding in ("Requires", "BindsTo", "Requisite", "PartOf"):
        assert BROKER_UNIT not in words(worker, "Unit", binding), f"{binding}= stops workers with the broker"


def test_target_starts_stops_and_waits_for_broker_and_workers():
    target = read_unit(TARGET)
    assert BROKER_UNIT in words(target, "Unit", "Wants")
    assert "multi-user.target" in words(target, "Install", "WantedBy")
    also = words(target, "Install", "Also")
    assert BROKER_UNIT in also and any(re.fullmatch(r"hq-worker@\d+\.service", u) for u in also)
    for unit_name in SERVICES:
        unit = read_unit(unit_name)
        assert TARGET in words(unit, "Unit", "PartOf")  # stop/restart hq.target reaches it
        assert TARGET in words(unit, "Unit", "Before")  # start hq.target waits for its READY=1
        assert TARGET in words(unit, "Install", "WantedBy")


@pytest.mark.parametrize("unit_name", sorted(SERVICES))
def test_exec_start_runs_the_installed_console_script_with_flags_it_takes(unit_name):
    exec_start = value(read_unit(unit_name), "Service", "ExecStart").split()
    program = SERVICES[unit_name]
    assert exec_start[0] == f"{VENV_BIN}/{program}"
    pyproject = (UNITS.parents[1] / "pyproject.toml").read_text()
    declared = re.search(rf'^{program} = "hq\.[\w.]+:\w+"$', pyproject, re.MULTILINE)
    assert declared, f"{program} is not a console script in pyproject.toml"
    script(program)  # and it is installed next to this Python
    args = [arg.replace("%i", "3") for arg in exec_start[1:]]
    parsed = config.build_parser(program, "", options.PROGRAMS[program]).parse_args(args)
    if program == "hq-worker":
        assert parsed.name == "hq-worker-3"


def read_env_file() -> tuple:
    """({name: value} of the set variables, every HQ_* name written, set or commented out)."""
    text = (UNITS / "hq.env").read_text()
    assigned = dict(re.findall(r"^(HQ_\w+)=(.*)$", text, re.MULTILINE))
    named = set(re.findall(r"^#?(HQ_\w+)=", text, re.MULTILINE))
    return assigned, named


def test_env_file_names_real_options_with_values_they_take():
    assigned, named = read_env_file()
    by_env = {opt.env: opt for prog in SERVICES.values() for opt in options.PROGRAMS[prog]}
    by_env[config.CONFIG_OPTION.env] = config.CONFIG_OPTION
    assert named <= set(by_env), f"not an option of hq-broker, hq-worker or hq-gateway: {named - set(by_env)}"
    assert {"HQ_BIND", "HQ_BACKEND", "HQ_DB", "HQ_CONFIG"} <= set(assigned)
    for name, raw in assigned.items():
        opt = by_env[name]
        if opt.type in (str, options.writable_file):  # paths: checked against the units below
            continue
        for item in raw.split(",") if opt.multiple else [raw]:
            opt.type(item)  # raises with the rule broken


def test_env_file_paths_are_where_the_units_let_the_programs_write():
    assigned, _ = read_env_file()
    run = "/run/" + value(read_unit(BROKER_UNIT), "Service", "RuntimeDirectory") + "/"
    state = "/var/lib/" + value(read_unit(WORKER_UNIT), "Service", "StateDirectory") + "/"
    assert assigned["HQ_DB"].startswith(state)
    assert assigned["HQ_BACKEND"].startswith("ipc://" + run)
    assert assigned["HQ_ENDPOINT_FILE"].startswith(run)
    # the gateway's unix sockets and endpoint file: in its own runtime directory, which a
    # restart of the broker (whose /run/hq systemd removes) leaves alone
    gateway = "/run/" + value(read_unit(GATEWAY_UNIT), "Service", "RuntimeDirectory") + "/"
    assert gateway != run
    unix = [a for a in assigned["HQ_LISTEN"].split(",") if a.startswith("unix://")]
    assert unix and all(a.startswith("unix://" + gateway) for a in unix)
    assert f"--endpoint-file={gateway}" in value(read_unit(GATEWAY_UNIT), "Service", "ExecStart")


def installable_units(tmp_path: pathlib.Path) -> pathlib.Path:
    """The unit files with ExecStart pointing at this virtualenv instead of /opt/hq/venv."""
    out = tmp_path / "units"
    out.mkdir()
    for name in (BROKER_UNIT, WORKER_UNIT, GATEWAY_UNIT, TARGET):
        (out / name).write_text((UNITS / name).read_text().replace(VENV_BIN, BIN))
    return out


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip(NO_SYSTEMD.format(tool="systemd-analyze"))
    units = installable_units(tmp_path)
    names = [BROKER_UNIT, WORKER_UNIT, GATEWAY_UNIT, TARGET, "hq-worker@0.service"]
    result = subprocess.run(
        [tool, "verify", "--man=no", *(f"./{n}" for n in names)],
        cwd=units,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Lines about the host's own units are not ours to fix; any about hq's are.
    ours = [line for line in result.stderr.splitlines() if "hq" in line]
    assert result.returncode == 0 and ours == [], result.stderr


def test_systemctl_enable_hq_target_enables_the_broker_and_two_workers(tmp_path):
    tool = shutil.which("systemctl")
    if tool is None:
        pytest.skip(NO_SYSTEMD.format(tool="systemctl"))
    root = tmp_path / "root"
    system = root / "etc" / "systemd" / "system"
    shutil.copytree(installable_units(tmp_path), system)

    def systemctl(*args):
        result = subprocess.run(
            [tool, f"--root={root}", *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr

    def wanted():
        folder = system / "hq.target.wants"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

    systemctl("enable", TARGET)
    assert (system / "multi-user.target.wants" / TARGET).is_symlink()
    assert wanted() == [BROKER_UNIT, "hq-worker@0.service", "hq-worker@1.service"]
    systemctl("enable", "hq-worker@2.service")  # scaling up: one more instance joins hq.target
    assert wanted() == [BROKER_UNIT, "hq-worker@0.service", "hq-worker@1.service", "hq-worker@2.service"]
    systemctl("disable", TARGET)
    assert not (system / "multi-user.target.wants" / TARGET).exists()
    assert wanted() == ["hq-worker@2.service"]
