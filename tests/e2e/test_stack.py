"""`make up` / `make down` (infra/stack.sh) on ports and a state folder of the test's own: up twice is
harmless, two instances of credits and chat run side by side, the supervisor restarts a part that died
and says so, down leaves no process of ours."""

import os
import signal
import subprocess
import time

import httpx
import pytest

from tests.support import ROOT, free_port, free_ports, processes_with_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def processes_of(state_dir) -> set[int]:
    return processes_with_env("BYOK_STATE_DIR", str(state_dir))


def settled(state_dir, quiet_s: float = 3, timeout_s: float = 60) -> set[int]:
    """Our processes, once the set has not changed for `quiet_s`."""
    deadline = time.monotonic() + timeout_s
    last = processes_of(state_dir)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = processes_of(state_dir)
        if now == last:
            return now
        last = now
    raise TimeoutError(f"our processes kept changing for {timeout_s} s")


def describe(pids: set[int]) -> dict[int, str]:
    def cmdline(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
        except OSError:
            return "(gone)"

    return {pid: cmdline(pid) for pid in pids}


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not in {timeout_s} s")
        time.sleep(0.1)
    return value


def pid_of(state_dir, name: str) -> int | None:
    try:
        return int((state_dir / "services" / f"{name}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_twice_two_instances_a_dead_part_restarted_and_down(private_state):
    ports = {
        name: str(free_port())
        for name in ("BYOK_KAFKA_PORT", "BYOK_KAFKA_CONTROLLER_PORT", "BYOK_PG_PORT", "SIM_PORT", "VALIDATION_PORT")
    }
    ports |= {"CHAT_PORT": str(free_ports(2)), "CREDITS_PORT": str(free_ports(2))}  # instance 2: port + 1
    env = {
        **os.environ,
        **ports,
        "BYOK_STATE_DIR": str(private_state),
        "BYOK_KAFKA_HEAP": "512M",
        "CREDITS_INSTANCES": "2",
        "CHAT_INSTANCES": "2",
    }
    for var in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "BYOK_EXTERNAL_KAFKA", "HTTP_PORT", "CREDITS_URL"):
        env.pop(var, None)
    chat, credits = int(ports["CHAT_PORT"]), int(ports["CREDITS_PORT"])

    def stack(cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", "infra/stack.sh", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )

    try:
        first = stack("up")
        assert first.returncode == 0, first.stderr[-3000:]
        started = settled(private_state)  # each credit instance starts its relay child a little later
        assert len(started) >= 9, "kafka, postgres, six services and the supervisor"
        for port in (chat, chat + 1, credits, credits + 1, int(ports["VALIDATION_PORT"]), int(ports["SIM_PORT"])):
            assert healthy(port), port
        page = httpx.get(f"http://127.0.0.1:{chat + 1}/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert "supervisor: running" in stack("status").stdout

        second = stack("up")
        assert second.returncode == 0 and "already running" in second.stderr
        assert processes_of(private_state) == started, (
            f"a second up starts nothing new: {describe(processes_of(private_state) ^ started)}\n"
            + (private_state / "logs" / "supervisor.log").read_text()
        )

        # The supervisor brings back a part that died, without anyone running `up`.
        dead = pid_of(private_state, "credits-2")
        os.kill(dead, signal.SIGKILL)
        killed_at = time.monotonic()
        reborn = wait_until(
            lambda: (pid := pid_of(private_state, "credits-2")) not in (None, dead) and pid,
            30,
            "a new credits-2 process",
        )
        print(f"credits-2 restarted {time.monotonic() - killed_at:.2f} s after the SIGKILL")  # not asserted
        wait_until(lambda: healthy(credits + 1), 60, "credits-2 healthy again")
        log = (private_state / "logs" / "supervisor.log").read_text()
        assert f"credits-2 died (pid {dead}); restarting it" in log
        assert f"credits-2 restarted (pid {reborn})" in log
        # Under its instance name, a static member: it joined the group as credits-2 again.
        assert "Consumer credits-2-" in (private_state / "logs" / "credits-2.log").read_text()
    finally:
        down = stack("down")
    assert down.returncode == 0, down.stderr[-2000:]
    time.sleep(0.5)
    assert processes_of(private_state) == set(), "down leaves no process of ours"


def test_instances_on_clashing_ports_are_refused_before_anything_starts(private_state):
    env = {
        **os.environ,
        "BYOK_STATE_DIR": str(private_state),
        "CHAT_INSTANCES": "2",
        "CHAT_PORT": "18000",
        "CREDITS_PORT": "18001",
        "VALIDATION_PORT": "18002",
        "SIM_PORT": "18090",
    }
    done = subprocess.run(
        ["bash", "infra/stack.sh", "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "two parts would listen on port 18001" in done.stderr
    assert processes_of(private_state) == set()


def test_down_leaves_running_the_broker_and_database_that_up_did_not_start(private_state):
    """`make test` (or a developer) may have started Kafka and PostgreSQL; `make up` then only adds the
    services, and `make down` stops those and nothing else (DESIGN "Commands")."""
    ports = {
        name: str(free_port())
        for name in ("BYOK_KAFKA_PORT", "BYOK_KAFKA_CONTROLLER_PORT", "BYOK_PG_PORT", "SIM_PORT", "VALIDATION_PORT")
    }
    ports |= {"CHAT_PORT": str(free_port()), "CREDITS_PORT": str(free_port())}
    env = {**os.environ, **ports, "BYOK_STATE_DIR": str(private_state), "BYOK_KAFKA_HEAP": "512M"}
    for var in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "BYOK_EXTERNAL_KAFKA", "HTTP_PORT", "CREDITS_URL"):
        env.pop(var, None)

    def run(script: str, cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", f"infra/{script}", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )

    try:
        for script in ("kafka.sh", "postgres.sh"):
            assert run(script, "up").returncode == 0
        assert run("stack.sh", "up").returncode == 0
        down = run("stack.sh", "down")
        assert down.returncode == 0, down.stderr[-2000:]
        assert "kafka left running" in down.stderr and "postgres left running" in down.stderr
        assert run("kafka.sh", "status").returncode == 0, "the broker up did not start still runs"
        assert run("postgres.sh", "status").returncode == 0, "the database up did not start still runs"
        assert not any("services." in cmd for cmd in describe(processes_of(private_state)).values())
    finally:
        run("stack.sh", "down")
        run("kafka.sh", "down")
        run("postgres.sh", "down")
    time.sleep(0.5)
    assert processes_of(private_state) == set()


# --- Ctrl-C on `make run`, and `make down` after a run that was killed --------------------------------


def private_stack_env(private_state) -> tuple[dict[str, str], list[int]]:
    """The environment of a stack on ports and a state folder of the test's own, and its ports."""
    names = ("BYOK_KAFKA_PORT", "BYOK_KAFKA_CONTROLLER_PORT", "BYOK_PG_PORT", "SIM_PORT", "VALIDATION_PORT")
    ports = {name: str(free_port()) for name in names} | {
        "CHAT_PORT": str(free_port()),
        "CREDITS_PORT": str(free_port()),
    }
    env = {**os.environ, **ports, "BYOK_STATE_DIR": str(private_state), "BYOK_KAFKA_HEAP": "512M"}
    for var in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "BYOK_EXTERNAL_KAFKA", "HTTP_PORT", "CREDITS_URL"):
        env.pop(var, None)
    return env, [int(p) for p in ports.values()]


def listening(ports: list[int]) -> list[int]:
    import socket

    found = []
    for port in ports:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                found.append(port)
    return found


def start_make_run(env: dict[str, str], log_path) -> subprocess.Popen:
    """`make run` as a terminal runs it: the leader of its own process group, SIGINT not ignored;
    returns once it says the stack is up (the supervisor runs) and the page answers."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["make", "run"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # A terminal's shell leaves SIGINT to its default; a test run started in the background
            # inherits it ignored, and bash can never trap a signal ignored when it starts.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    page = f"http://127.0.0.1:{env['CHAT_PORT']}/"

    def answers() -> bool:
        assert proc.poll() is None, f"make run exited:\n{log_path.read_text()[-3000:]}"
        try:
            return "byok-credits is up" in log_path.read_text() and httpx.get(page, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(answers, 240, "the page of make run")
    return proc


def nothing_left(state_dir, ports: list[int], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while (left := processes_of(state_dir)) or listening(ports):
        if time.monotonic() > deadline:
            raise AssertionError(f"left after {within_s} s: {describe(left)}, listening on {listening(ports)}")
        time.sleep(0.5)


def sweep(env: dict[str, str], state_dir) -> None:
    """Whatever a failed test left: stop it."""
    subprocess.run(["bash", "infra/stack.sh", "down"], cwd=ROOT, env=env, capture_output=True, timeout=300)
    for pid in processes_of(state_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ctrl_c_on_make_run_leaves_no_process_and_no_port(private_state, tmp_path):
    """The terminal's SIGINT reaches the whole process group of `make run`: everything it started stops
    (the supervisor first, so it restarts nothing), PostgreSQL and Kafka included, and make exits."""
    env, ports = private_stack_env(private_state)
    log = tmp_path / "make-run.log"
    try:
        proc = start_make_run(env, log)
        assert processes_of(private_state), "the stack runs"
        interrupted_at = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            # What was still stopping, and how far the stop got (stop_pid logs each part once it stopped).
            left = describe(processes_of(private_state))
            tail = log.read_text()[-3000:]
            raise AssertionError(f"make run still running 90 s after Ctrl-C; left: {left}\n{tail}") from None
        nothing_left(private_state, ports, within_s=30)
        print(f"everything stopped {time.monotonic() - interrupted_at:.1f} s after Ctrl-C")  # not asserted
        out = log.read_text()
        assert "supervisor stopped" in out and "postgres stopped" in out and "kafka node 1 stopped" in out, out[-3000:]
        assert "restarted" not in (private_state / "logs" / "supervisor.log").read_text()
    finally:
        sweep(env, private_state)


def test_make_down_stops_what_a_killed_run_left_behind(private_state, tmp_path):
    """A run killed outright (SIGKILL to its group: no trap runs) whose pid files of the supervisor and
    the chat are gone too (as an earlier version's Ctrl-C left them): `make down` still finds the
    supervisor and every service by their mark, and stops them with the broker and database."""
    env, ports = private_stack_env(private_state)
    try:
        proc = start_make_run(env, tmp_path / "make-run.log")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        for name in ("supervisor", "chat"):
            (private_state / "services" / f"{name}.pid").unlink()
        time.sleep(1)
        assert any("stack.sh supervise" in cmd for cmd in describe(processes_of(private_state)).values())
        down = subprocess.run(["make", "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
        assert "stopping a supervisor left by an earlier run" in down.stderr, down.stderr[-3000:]
        assert "postgres stopped" in down.stderr
        nothing_left(private_state, ports, within_s=10)
    finally:
        sweep(env, private_state)
