"""transferctl watch in a real terminal: tmux runs a shell, the test types into it and reads its screen.

The daemon stages each job for three seconds, so the live view is seen with
jobs still on their way before they arrive.
"""

import re
import shutil
import subprocess
import time
import uuid

import pytest

from tests.test_cli import CLI, TRANSFERCTL, cli_env, destination, start_daemon

WIDTH, HEIGHT = 120, 30
EXITED = r"EXIT=\d+"  # what the shell echoes after the command (the typed line shows "EXIT=$?")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    started = start_daemon(str(tmp_path_factory.mktemp("terminal")), stager={"delay": "3"})
    yield started
    started.stop()


class Terminal:
    """A tmux server of its own with one pane running bash; screen() is what a person would see."""

    def __init__(self, env):
        if shutil.which("tmux") is None:
            pytest.fail("tmux is not installed (scripts/test.sh installs it)")
        self.env = {**env, "TERM": "xterm-256color"}
        self.socket = f"transferctl-test-{uuid.uuid4().hex[:12]}"
        self.tmux("new-session", "-d", "-s", "main", "-x", str(WIDTH), "-y", str(HEIGHT), "bash --norc --noprofile")
        self.screens = []

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], env=self.env, check=True,
                              capture_output=True, text=True, timeout=10).stdout

    def type(self, line):
        self.tmux("send-keys", "-t", "main", "-l", line)
        self.tmux("send-keys", "-t", "main", "Enter")

    def press(self, key):
        self.tmux("send-keys", "-t", "main", key)

    def screen(self):
        text = self.tmux("capture-pane", "-p", "-t", "main")
        self.screens.append(text)
        return text

    def wait_for(self, pattern, timeout=30):
        """The first screen matching the regular expression; every screen seen on the way is kept in self.screens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} never appeared; the screen:\n{self.screens[-1]}")

    def close(self):
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], env=self.env, capture_output=True, timeout=10)


@pytest.fixture
def terminal(daemon, tmp_path):
    env = cli_env(tmp_path, TRANSFERD_URL=daemon.url)
    term = Terminal(env)
    yield term, CLI(env)
    term.close()


def job_lines(screen, job_ids):
    """The lines of the live view, by the short job id that starts each."""
    return {job_id: line for job_id in job_ids for line in screen.splitlines() if line.startswith(job_id[:8])}


def test_watch_shows_progress_until_success(terminal, daemon):
    """When watch runs in a terminal, its screen shows each job on its way, then every job SUCCESS, and exit 0."""
    term, cli = terminal
    job_ids = [cli.ok("submit", product, destination(daemon)).strip() for product in ("sample-001", "sample-002")]
    term.type(f"{TRANSFERCTL} watch {' '.join(job_ids)} --interval 0.2; echo EXIT=$?")
    moving = term.wait_for("overall")
    assert len(job_lines(moving, job_ids)) == 2, moving
    assert "0/2 ended" in moving, moving
    final = term.wait_for(EXITED)
    assert "EXIT=0" in final, final
    lines = job_lines(final, job_ids)
    assert all("SUCCESS" in line and "delivered" in line for line in lines.values()), final
    assert "2/2 ended: 2 SUCCESS" in final
    assert not any("Traceback" in screen for screen in term.screens)


def test_timeout_in_terminal(terminal, daemon):
    """When --timeout passes in the live view, the view stays, one line says so, and the exit code is 2."""
    term, cli = terminal
    job_id = cli.ok("submit", "sample-001", destination(daemon)).strip()
    term.type(f"{TRANSFERCTL} watch {job_id} --interval 0.2 --timeout 0.5; echo EXIT=$?")
    final = term.wait_for(EXITED)
    assert "EXIT=2" in final, final
    assert "transferctl: timed out after 0.5 s: 1 of 1 job(s) have not ended" in final
    assert "0/1 ended: 1 STAGING" in final


def test_ctrl_c(terminal, daemon):
    """When the user presses Ctrl-C during watch, it stops with one line, no traceback, and exit 130."""
    term, cli = terminal
    job_id = cli.ok("submit", "sample-001", destination(daemon)).strip()
    term.type(f"{TRANSFERCTL} watch {job_id} --interval 0.2; echo EXIT=$?")
    term.wait_for("overall")
    term.press("C-c")
    final = term.wait_for(EXITED)
    assert "EXIT=130" in final and "transferctl: interrupted" in final, final
    assert "Traceback" not in final
