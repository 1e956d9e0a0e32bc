"""Benchmark transferd on its production backends: `.venv/bin/python scripts/benchmark.py [--quick]`.

Starts the real daemon (twistd) on a fresh MySQL database and a private
RabbitMQ queue prefix, drives its REST API from this process, measures the
same work done directly on MySQL and RabbitMQ (the raw floor), prints a table
of figures and removes everything it made.  docs/benchmarks.md explains the
figures.  The machine is small and shared, so compare the ratios printed by
one run rather than absolute rates across runs.

Section 10 (fair share, `--only fairness`) runs the daemon in this process
instead (wiring.build, with a slow stager of its own), on the same servers,
to see what the scheduler releases pass by pass.
"""

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

import MySQLdb
import pika
import pika.exceptions

from transferd import sample

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
MYSQL_URL = "mysql://root@127.0.0.1:3306/"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

LEVELS = (1, 16, 64)  # concurrent clients
STATUS_LEVELS = (1, 16)
PRODUCT = "sample-001"
STATUS_ROWS = 100_000  # jobs in the table for the /transferStatus latency figures
SMALL_ROWS = 100  # "nearly empty": the jobs table before any load
BATCH = 5_000  # rows per executemany when filling the table

# The end-to-end and memory measurements: transferd with [transfer] backend = fts
# against `twistd -n transferd-fakefts`, the local stager staging a small file.
SMALL_PRODUCT = "bench-small"
SMALL_PRODUCT_BYTES = 4096
FTS_TOKEN = "bench-fts-token"
E2E_CLIENTS = 16  # concurrent clients submitting
E2E_FTS = {"poll_interval": 0.5, "bulk_size": 100}
# Every job polled every second whatever its age (max_poll_interval = poll_interval): memory at the busiest polling.
RSS_FTS = {"poll_interval": 1, "max_poll_interval": 1, "bulk_size": 100}
RSS_PREFETCH = 32
THROUGHPUT_GOAL = 100  # jobs/s, submit to SUCCESS
RSS_GOAL_MIB = 200  # daemon RSS with RSS jobs TRANSFERRING

# How much work each measurement does.  Submissions and their floor are
# measured `rounds` times, alternating, and the median round is reported.
# e2e: jobs submitted per end-to-end run, one run per prefetch; rss: jobs TRANSFERRING.
# scale_finished, scale_active: the jobs table of section 11; scale_rss: jobs TRANSFERRING for its memory figure.
FULL = dict(rounds=3, submit={1: 400, 16: 2000, 64: 3000}, probe={1: 500, 16: 2000, 64: 3000}, status=2000,
            e2e=2000, prefetch=(8, 32), rss=10_000, batches=200, list=1000, fleet=2000,
            scale_finished=1_000_000, scale_active=100_000, scale_rss=100_000)
QUICK = dict(rounds=1, submit={1: 100, 16: 400, 64: 640}, probe={1: 100, 16: 400, 64: 640}, status=400,
             e2e=300, prefetch=(32,), rss=3000, batches=40, list=200, fleet=300,
             scale_finished=100_000, scale_active=10_000, scale_rss=10_000)
# A run without --only runs these; scale (section 11) and soak (12) run only when named: the soak alone takes
# half an hour, and the scale section fills the shared server with a million rows.
SECTIONS = ("backends", "e2e", "rss", "v1", "events", "fleet", "fairness")
NAMED_ONLY = ("scale", "soak")
EVENTS_GOAL = 0.90  # jobs/s with events on, as a share of jobs/s with events off
EVENTS_PREFETCH = 32
FLEET_SIZES = (1, 2, 3)  # daemons on this machine, sharing the database and the broker
FLEET_PREFETCH = 32


# -- the backends -------------------------------------------------------------


def mysql_connect(server_url, database="", **options):
    """A plain mysqlclient connection, in a session set up as the daemon sets up its own (options: e.g. client_flag)."""
    parts = urlsplit(server_url)
    connection = MySQLdb.connect(
        host=parts.hostname or "127.0.0.1", port=parts.port or 3306, user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""), database=database, charset="utf8mb4", autocommit=False, **options,
    )
    cursor = connection.cursor()
    cursor.execute("SET time_zone = '+00:00'")
    cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    cursor.close()
    return connection


def amqp_connect(url):
    return pika.BlockingConnection(pika.URLParameters(url))


def _where(url):
    """host:port of a server URL, without its password."""
    return urlsplit(url).netloc.rpartition("@")[2]


def _url(url, path=None, **query):
    parts = urlsplit(url)
    if path is not None:
        parts = parts._replace(path=path)
    return urlunsplit(parts._replace(query=urlencode(query)))


class Backends:
    """A fresh database and a private queue prefix; close() drops both, whatever happened."""

    def __init__(self, mysql_url, amqp_url):
        token = uuid.uuid4().hex[:10]
        self.mysql_url = mysql_url
        self.amqp_url = amqp_url
        self.database = f"transferd_bench_{token}"
        self.prefix = f"bench-{token}"
        self.queues = [f"{self.prefix}.{name}{suffix}" for name in ("staging", "transfer") for suffix in ("", ".dead")]
        self.floor_queue = f"{self.prefix}.floor"
        # Fail now, saying why, rather than halfway through.
        try:
            amqp_connect(amqp_url).close()
        except pika.exceptions.AMQPError as error:
            raise SystemExit(f"benchmark: cannot reach RabbitMQ at {_where(amqp_url)}: {error!r}") from None
        try:
            self._execute(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4")
        except MySQLdb.Error as error:
            raise SystemExit(f"benchmark: cannot create a database on {_where(mysql_url)}: {error}") from None

    def database_url(self, pool_max=None):
        return _url(self.mysql_url, "/" + self.database, **({"pool_max": pool_max} if pool_max else {}))

    def queue_url(self):
        return _url(self.amqp_url, prefix=self.prefix)

    def connect(self):
        return mysql_connect(self.mysql_url, self.database)

    def count_jobs(self):
        connection = self.connect()
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT COUNT(*) FROM jobs")
            return cursor.fetchone()[0]
        finally:
            connection.close()

    def _execute(self, statement):
        connection = mysql_connect(self.mysql_url)
        try:
            connection.cursor().execute(statement)
        finally:
            connection.close()

    def close(self):
        with contextlib.suppress(Exception):
            self._execute(f"DROP DATABASE IF EXISTS `{self.database}`")
        with contextlib.suppress(Exception):
            connection = amqp_connect(self.amqp_url)
            channel = connection.channel()
            for name in self.queues + [self.floor_queue]:
                channel.queue_delete(name)
            channel.exchange_delete(f"{self.prefix}.events")  # the daemons' event exchange ([events] exchange)
            connection.close()


# -- the daemon -----------------------------------------------------------------


class Daemon:
    """The real `twistd -n transferd`, in its own session so that Ctrl-C here does not reach it.

    The defaults keep the workers idle (see the config below).  The
    end-to-end and memory measurements pass stager_delay=0, a larger prefetch
    and fts=(a running FakeFTS, {[fts] settings}): [transfer] backend = fts.
    """

    def __init__(self, workdir, backends, pool_max=None, prefetch=1, stager_delay=3600, fts=None, reconciler=None,
                 schemes="file", extra=None):
        self.workdir = workdir
        self.port = _free_port()
        self.logfile = os.path.join(workdir, "transferd.log")
        self.deliveries = os.path.join(workdir, "deliveries")
        self.config = os.path.join(workdir, "transferd.ini")
        self.archive = os.path.join(workdir, "archive")
        sample.create(self.archive)
        with open(os.path.join(self.archive, SMALL_PRODUCT), "wb") as handle:
            handle.write(bytes(range(256)) * (SMALL_PRODUCT_BYTES // 256))
        os.makedirs(self.deliveries)
        sections = {
            "api": {"endpoint": f"tcp:{self.port}:interface=127.0.0.1", "public_url": f"http://127.0.0.1:{self.port}"},
            "database": {"url": backends.database_url(pool_max)},
            # Prefetch 1 and an hour-long simulated tape recall: the staging
            # worker takes the first job and then waits, so the workers do no
            # database or broker work while submissions are measured.
            "queue": {"url": backends.queue_url(), "prefetch": prefetch},
            "stager": {
                "archive_root": self.archive,
                "staging_root": os.path.join(workdir, "staging"),
                "delay": stager_delay,
            },
            "transfer": {"allowed_schemes": schemes, "file_roots": self.deliveries},
            # No reconciler pass (beyond the one at start) and no requeueing during the run.
            "reconciler": {"interval": 3600, "requeue_after": 3600} if reconciler is None else reconciler,
        }
        if fts is not None:
            fake, settings = fts
            token_file = os.path.join(workdir, "fts-token")
            with open(token_file, "w") as handle:
                handle.write(FTS_TOKEN + "\n")
            sections["transfer"] = {"backend": "fts", "allowed_schemes": "gsiftp"}
            # The fake FTS does not copy (no --copy): the source and destination URLs are only recorded.
            sections["fts"] = {"endpoint": fake.url, "auth": "token", "token_file": token_file,
                               "source_template": "gsiftp://{staged_to}{path}", **settings}
        for section, values in (extra or {}).items():  # e.g. [events] for the events section
            sections.setdefault(section, {}).update(values)
        _write_config(self.config, sections)
        self.process = None

    def start(self, timeout=60):
        with open(self.logfile + ".stderr", "w") as stderr:
            self.process = subprocess.Popen(
                [TWISTD, "--pidfile=", "-n", "--logfile", self.logfile, "transferd", "--config", self.config],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True,
            )
        probe = [_get(f"/transferStatus?job_id={uuid.uuid4()}")]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transferd exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                drive(self.port, probe, 1, {404})
                return
            time.sleep(0.2)
        raise RuntimeError(f"transferd did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self, timeout=30):
        _terminate(self.process, timeout)

    def log_lines(self):
        """Lines logged so far, rotated files included (twistd starts a new file every 1 MB)."""
        directory, name = os.path.split(self.logfile)
        total = 0
        for entry in os.listdir(directory):
            if entry == name or (entry.startswith(name + ".") and entry[len(name) + 1:].isdigit()):
                with open(os.path.join(directory, entry), errors="replace") as handle:
                    total += sum(1 for _ in handle)
        return total

    def log_tail(self):
        text = []
        for path in (self.logfile, self.logfile + ".stderr"):
            with contextlib.suppress(OSError), open(path, errors="replace") as handle:
                text.append(handle.read()[-2000:])
        return "\n".join(text)


def _terminate(process, timeout):
    """SIGTERM, then SIGKILL after timeout seconds (a process not started or already gone: nothing)."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_config(path, sections):
    with open(path, "w") as handle:
        for section, values in sections.items():
            handle.write(f"[{section}]\n")
            handle.writelines(f"{key} = {value}\n" for key, value in values.items())
            handle.write("\n")


class FakeFTS:
    """`twistd -n transferd-fakefts` (transferd.testing.fakefts) on a free port, with a bearer token.

    Every file of a job takes `duration` seconds, then the job is FINISHED:
    0 for the end-to-end measurement, days for the memory one (the jobs stay
    ACTIVE).  No --copy: the fake only records the URLs.
    """

    def __init__(self, workdir, duration):
        self.workdir = workdir
        self.duration = duration
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = os.path.join(workdir, "fakefts.log")
        self.process = None

    def start(self, timeout=30):
        os.makedirs(self.workdir, exist_ok=True)
        with open(self.logfile + ".stderr", "w") as stderr:
            self.process = subprocess.Popen(
                [TWISTD, "--pidfile=", "-n", "--logfile", self.logfile, "transferd-fakefts",
                 "--endpoint", f"tcp:{self.port}:interface=127.0.0.1", "--token", FTS_TOKEN,
                 "--duration", str(self.duration)],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                with open(self.logfile + ".stderr", errors="replace") as handle:
                    raise RuntimeError(f"transferd-fakefts exited with {self.process.returncode}: {handle.read()}")
            with contextlib.suppress(OSError):
                drive(self.port, [_get("/")], 1, {200})
                return
            time.sleep(0.2)
        raise RuntimeError(f"transferd-fakefts did not answer within {timeout}s")

    def requests(self):
        """How many requests of each kind ("POST /jobs", "GET /jobs/{ids}") the fake has seen."""
        request = b"GET /_fake/state HTTP/1.1\r\nHost: bench\r\n\r\n"

        async def fetch():
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                writer.write(request)
                return await _read_response(reader)
            finally:
                writer.close()

        status, body = asyncio.run(fetch())
        return json.loads(body)["requests"] if status == 200 else {}

    def stop(self, timeout=10):
        _terminate(self.process, timeout)


# -- CPU accounting -------------------------------------------------------------


class CPUMeter:
    """CPU used by the daemon, this process (the load generator), MariaDB and RabbitMQ.

    Tells which process was busy: the daemon is one Python process, so near
    100% of one core it is the bottleneck.  Servers on another host are
    simply not shown.
    """

    # The servers' ports on this host (main() sets them from --mysql-url and --amqp-url).
    server_ports = {"mariadb": 3306, "rabbitmq": 5672}

    def __init__(self, daemon_pid, **others):
        self.pids = {"daemon": daemon_pid, "loadgen": os.getpid(), **others}
        for name, port in self.server_ports.items():
            pid = _listening_process(port)
            if pid is not None:
                self.pids[name] = pid

    def sample(self):
        return {name: _cpu_seconds(pid) for name, pid in self.pids.items()}, time.monotonic()

    @staticmethod
    def seconds(before, after):
        """({name: CPU seconds}, wall seconds) between two samples."""
        (start, t0), (end, t1) = before, after
        return {name: end[name] - start[name] for name in start}, t1 - t0


def _listening_process(port):
    """The process listening on TCP port here (not another server of the same name, e.g. a test's), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            for line in list(handle)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{entry}/fd"):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        return int(entry)
    return None


def _cpu_seconds(pid):
    """utime + stime of a process, all its threads included."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid):
    """VmRSS, VmHWM (peak RSS), RssAnon, RssFile (KiB) and Threads of a process, from /proc/<pid>/status."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                values[key] = int(rest.split()[0])
    return values


# -- the HTTP load generator ----------------------------------------------------
#
# A minimal HTTP/1.1 keep-alive client on asyncio streams: C coroutines, each
# with its own connection, sending pre-built requests one after the other.  It
# costs a small fraction of what the daemon spends per request (the loadgen
# figures say how much), so it is not what limits the measured rates.


def _get(path):
    return f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()


def _post_form(path, fields):
    body = urlencode(fields).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _read_response(reader):
    """(status, body) of one response: Content-Length or chunked (Klein answers chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:] if line)
    if b"content-length" in headers:
        return status, await reader.readexactly(int(headers[b"content-length"]))
    body = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, b"".join(body)
        body.append(chunk[:-2])


async def _client(port, requests, expected, latencies):
    """One client: its own connection, one request at a time."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request in requests:
            start = time.perf_counter()
            writer.write(request)
            status, body = await _read_response(reader)
            latencies.append(time.perf_counter() - start)
            if status not in expected:
                raise RuntimeError(f"the daemon answered {status}: {body[:300]!r}")
    finally:
        writer.close()


def drive(port, requests, concurrency, expected):
    """Send requests over `concurrency` connections; return (wall seconds, latencies, our CPU seconds)."""
    latencies = []

    async def run():
        shares = [requests[i::concurrency] for i in range(concurrency)]
        await asyncio.gather(*(_client(port, share, expected, latencies) for share in shares))

    cpu, start = time.process_time(), time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start, latencies, time.process_time() - cpu


class Load:
    """One HTTP measurement: rate, latencies, and the CPU each process spent on it."""

    def __init__(self, count, wall, latencies, cpu):
        self.count = count
        self.rate = count / wall
        self.latencies = sorted(latencies)
        self.cpu_percent = {name: 100 * seconds / wall for name, seconds in cpu.items()}
        self.daemon_ms = 1000 * cpu["daemon"] / count  # daemon CPU per request
        self.loadgen_us = 1e6 * cpu["loadgen"] / count  # load-generator CPU per request

    def percentile(self, p):
        """The p-th percentile latency in ms."""
        return 1000 * self.latencies[min(len(self.latencies) - 1, int(p / 100 * len(self.latencies)))]


def measure_http(daemon, meter, requests, concurrency, expected):
    """Warm up with one request per connection, then time the rest of `requests`."""
    drive(daemon.port, requests[:concurrency], concurrency, expected)
    before = meter.sample()
    wall, latencies, _ = drive(daemon.port, requests[concurrency:], concurrency, expected)
    cpu, _ = CPUMeter.seconds(before, meter.sample())
    return Load(len(requests) - concurrency, wall, latencies, cpu)


def submit_requests(daemon, count):
    return [
        _post_form("/submitTransfer", {
            "product_id": PRODUCT,
            "destination_path": "file://" + quote(os.path.join(daemon.deliveries, f"copy-{i}")),
        })
        for i in range(count)
    ]


# -- the raw floor: the same work without transferd ------------------------------


INSERT_JOB = ("INSERT INTO jobs_floor (job_id, product_id, destination_path, submitter, status, stage_attempts,"
              " lease_owner, lease_until, time_submitted) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)")


def _job_row(job_id):
    """The row store.create() inserts for a new job (same columns, same kinds of values)."""
    now = time.time()
    return (job_id, PRODUCT, "file:///srv/deliveries/copy", None, "SUBMITTED", 0, "queued", now + 30,
            datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(tzinfo=None))


def _publish(channel, queue, job_id):
    """One persistent, mandatory publish; in confirm mode it returns once RabbitMQ confirmed it."""
    properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, content_type="text/plain")
    channel.basic_publish("", queue, job_id.encode(), properties, mandatory=True)


def run_threads(concurrency, count, open_worker):
    """Do count items on `concurrency` threads; return the wall seconds.

    open_worker() -> (do(item), close()) runs in each thread, so every thread
    opens its own connections before the clock starts.
    """
    ready = threading.Barrier(concurrency + 1)
    stop = threading.Event()  # set when the main thread gives up (Ctrl-C, a failed worker)
    errors = []

    def worker(items):
        try:
            do, close = open_worker()
        except Exception as error:
            errors.append(error)
            ready.abort()
            return
        try:
            ready.wait()
            for item in items:
                if stop.is_set():
                    break
                do(item)
        except Exception as error:
            errors.append(error)
            stop.set()
        finally:
            close()

    items = [str(uuid.uuid4()) for _ in range(count)]
    threads = [threading.Thread(target=worker, args=(items[i::concurrency],), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        with contextlib.suppress(threading.BrokenBarrierError):
            ready.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        stop.set()
    if errors:
        raise errors[0]
    return wall


def floor_insert(backends, concurrency, count):
    """INSERT + COMMIT of job rows, one mysqlclient connection per thread."""

    def open_worker():
        connection = backends.connect()
        cursor = connection.cursor()

        def do(job_id):
            cursor.execute(INSERT_JOB, _job_row(job_id))
            connection.commit()

        return do, connection.close

    return count / run_threads(concurrency, count, open_worker)


def floor_publish(backends, concurrency, count):
    """Persistent publishes, each waiting for its confirm, one BlockingConnection per thread."""

    def open_worker():
        connection = amqp_connect(backends.amqp_url)
        channel = connection.channel()
        channel.confirm_delivery()
        return (lambda job_id: _publish(channel, backends.floor_queue, job_id)), connection.close

    return count / run_threads(concurrency, count, open_worker)


def floor_sequence(backends, concurrency, count):
    """What a submission must do at least: INSERT + COMMIT, then publish and wait for the confirm."""

    def open_worker():
        database = backends.connect()
        cursor = database.cursor()
        broker = amqp_connect(backends.amqp_url)
        channel = broker.channel()
        channel.confirm_delivery()

        def do(job_id):
            cursor.execute(INSERT_JOB, _job_row(job_id))
            database.commit()
            _publish(channel, backends.floor_queue, job_id)

        def close():
            database.close()
            broker.close()

        return do, close

    return count / run_threads(concurrency, count, open_worker)


def prepare_floor(backends):
    """A scratch copy of the jobs table and a scratch durable queue: the daemon's stay untouched."""
    connection = backends.connect()
    connection.cursor().execute("CREATE TABLE jobs_floor LIKE jobs")
    connection.close()
    broker = amqp_connect(backends.amqp_url)
    broker.channel().queue_declare(backends.floor_queue, durable=True)
    broker.close()


class Floor:
    """The raw floor at one concurrency: inserts alone, publishes alone, and the two in sequence."""

    def __init__(self, insert, publish, sequence, cpu_percent):
        self.insert, self.publish, self.sequence, self.cpu_percent = insert, publish, sequence, cpu_percent

    @property
    def serial(self):
        """The rate if each item waited for an insert, then a publish, each at its measured rate."""
        return 1 / (1 / self.insert + 1 / self.publish)


def measure_floor(backends, meter, concurrency, count):
    insert = floor_insert(backends, concurrency, count)
    publish = floor_publish(backends, concurrency, count)
    before = meter.sample()
    sequence = floor_sequence(backends, concurrency, count)
    cpu, wall = CPUMeter.seconds(before, meter.sample())
    return Floor(insert, publish, sequence, {name: 100 * seconds / wall for name, seconds in cpu.items()})


# -- filling the table ------------------------------------------------------------


def insert_finished_jobs(backends, count):
    """Add count finished (SUCCESS) jobs straight into the daemon's table; return their ids.

    Finished jobs, so that neither the workers nor the reconciler look at them.
    """
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    query = ("INSERT INTO jobs (job_id, product_id, status, detailed_status, destination_path, stager_path,"
             " stager_hostname, stager_status, stage_attempts, time_submitted, time_staging, time_staged,"
             " time_transferring, time_success) VALUES"
             " (%s, %s, 'SUCCESS', 'delivered', %s, %s, 'stager.example.org', 'staged', 1, %s, %s, %s, %s, %s)")
    job_ids = [str(uuid.uuid4()) for _ in range(count)]
    connection = backends.connect()
    try:
        cursor = connection.cursor()
        for first in range(0, count, BATCH):
            rows = []
            for n, job_id in enumerate(job_ids[first:first + BATCH], first):
                when = now - datetime.timedelta(seconds=n)
                rows.append((job_id, f"product-{n}", f"davs://dest.example.org/data/product-{n}",
                             f"/srv/staging/{job_id}/product-{n}", when, when, when, when, when))
            cursor.executemany(query, rows)  # mysqlclient sends one multi-row INSERT per batch
            connection.commit()
    finally:
        connection.close()
    return job_ids


# -- the measurements ---------------------------------------------------------------


def loadgen_check(daemon, meter, work):
    """GET /transferStatus of unknown job ids (one primary-key read): the cheapest request there is.

    Its rate is what the daemon can do at best; the load generator's CPU per
    request gives the load generator's own ceiling, to compare with it.
    """
    results = {}
    for concurrency in LEVELS:
        requests = [_get(f"/transferStatus?job_id={uuid.uuid4()}") for _ in range(work["probe"][concurrency])]
        results[concurrency] = measure_http(daemon, meter, requests, concurrency, {404})
    return results


def submit_throughput(daemon, backends, meter, work):
    """POST /submitTransfer and its raw floor at each concurrency, alternating, `rounds` times each.

    Alternating puts the daemon and its floor in the same minute of a noisy
    machine; the median round (by rate) of each is kept.
    """
    prepare_floor(backends)
    results = {}
    for concurrency in LEVELS:
        count = work["submit"][concurrency]
        loads, floors = [], []
        for _ in range(work["rounds"]):
            loads.append(measure_http(daemon, meter, submit_requests(daemon, count + concurrency), concurrency, {202}))
            floors.append(measure_floor(backends, meter, concurrency, count))
        results[concurrency] = (_median(loads, "rate"), _median(floors, "sequence"))
    return results


def measure_http_pair(daemons, meter, count, concurrency):
    """Submissions to two daemons sharing the database and the queues, concurrency/2 clients each, at once."""
    share = concurrency // 2
    requests = [submit_requests(daemon, count // 2 + share) for daemon in daemons]
    for daemon, mine in zip(daemons, requests):
        drive(daemon.port, mine[:share], share, {202})
    before = meter.sample()
    start = time.perf_counter()
    runs = [Background(daemon.port, mine[share:], share, {202}) for daemon, mine in zip(daemons, requests)]
    latencies = [latency for run in runs for latency in run.join()[1]]
    wall = time.perf_counter() - start
    cpu, _ = CPUMeter.seconds(before, meter.sample())
    cpu["daemon"] += cpu.pop("daemon2")  # both daemons' CPU, per submission
    return Load(len(latencies), wall, latencies, cpu)


def submit_two_daemons(daemons, backends, meter, work):
    """The highest concurrency again, spread over two daemons (as behind a load balancer), against the floor."""
    concurrency = max(LEVELS)
    count = work["submit"][concurrency]
    loads, floors = [], []
    for _ in range(work["rounds"]):
        loads.append(measure_http_pair(daemons, meter, count, concurrency))
        floors.append(measure_floor(backends, meter, concurrency, count))
    return _median(loads, "rate"), _median(floors, "sequence")


def _median(items, attribute):
    return sorted(items, key=lambda item: getattr(item, attribute))[len(items) // 2]


def status_latency(daemon, meter, job_ids, work, rng):
    """GET /transferStatus of random existing jobs, at 1 and 16 clients."""
    results = {}
    for concurrency in STATUS_LEVELS:
        requests = [_get(f"/transferStatus?job_id={rng.choice(job_ids)}") for _ in range(work["status"] + concurrency)]
        results[concurrency] = measure_http(daemon, meter, requests, concurrency, {200})
    return results


# -- end to end and memory: transferd with FTS3 (the fake) ------------------------------


class Watch:
    """Reads a daemon's jobs table on a connection of its own (one GROUP BY instead of N status requests)."""

    def __init__(self, backends):
        self.connection = backends.connect()
        self.statements = 0  # its own, sent to the server (a query and a commit each): left out of statements()

    def query(self, statement, params=()):
        cursor = self.connection.cursor()
        cursor.execute(statement, params)
        rows = cursor.fetchall()
        self.connection.commit()  # the next query sees what has been committed since
        self.statements += 2
        return rows

    def statements_so_far(self):
        """(statements, commits) the whole server has had from its clients, this watch's own left out: what the
        daemon sent, on a server nothing else uses meanwhile (its Questions and Com_commit)."""
        counts = dict(self.query("SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Com_commit')"))
        return int(counts["Questions"]) - self.statements, int(counts["Com_commit"]) - self.statements // 2

    def counts(self):
        return dict(self.query("SELECT status, COUNT(*) FROM jobs GROUP BY status"))

    def close(self):
        with contextlib.suppress(MySQLdb.Error):
            self.connection.close()


def wait_for_jobs(watch, daemons, done, what, timeout, stall=60, interval=0.1):
    """Poll the jobs table until done(counts by status); fail on ERROR jobs, a dead daemon or a stall.

    daemons: the daemon, or a list of them (a fleet: any of them dying fails the wait).
    """
    daemons = list(daemons) if isinstance(daemons, (list, tuple)) else [daemons]
    start = changed = time.monotonic()
    last = None
    while True:
        counts = watch.counts()
        if done(counts):
            return counts
        if counts.get("ERROR"):
            reason = watch.query("SELECT detailed_status FROM jobs WHERE status = 'ERROR' LIMIT 1")[0][0]
            raise RuntimeError(f"{counts['ERROR']} job(s) ended in ERROR, for example: {reason}")
        for daemon in daemons:
            if daemon.process.poll() is not None:
                raise RuntimeError(f"transferd exited with {daemon.process.returncode}:\n{daemon.log_tail()}")
        now = time.monotonic()
        if counts != last:
            last, changed = counts, now
        if now - changed > stall or now - start > timeout:
            raise RuntimeError(f"gave up waiting for {what} after {now - start:.0f}s"
                               f" (no change for {now - changed:.0f}s); jobs by status: {counts}\n"
                               + "\n".join(daemon.log_tail() for daemon in daemons))
        time.sleep(interval)


def wait_until(check, what, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what} after {timeout}s")
        time.sleep(interval)


class Background:
    """drive() in a thread, while this thread watches the jobs table."""

    def __init__(self, port, requests, concurrency, expected):
        self.result = self.error = None

        def run():
            try:
                self.result = drive(port, requests, concurrency, expected)
            except BaseException as error:  # re-raised by join()
                self.error = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


def fts_requests(daemon, count, prefix):
    """Submissions of the small product to gsiftp://localhost/<deliveries>/<prefix>-<i>."""
    return [
        _post_form("/submitTransfer", {
            "product_id": SMALL_PRODUCT,
            "destination_path": "gsiftp://localhost" + quote(os.path.join(daemon.deliveries, f"{prefix}-{i}")),
        })
        for i in range(count)
    ]


def start_with_fts(args, stack, workdir, duration, prefetch, fts_settings, extra=None):
    """A fresh database and queue prefix, the fake FTS and transferd on them; the stack undoes all three."""
    backends = Backends(args.mysql_url, args.amqp_url)
    stack.callback(backends.close)
    fake = FakeFTS(workdir, duration)
    stack.callback(fake.stop)
    fake.start()
    # transferd's own reconciler settings (interval 30 s, lease 30 s, requeue_after 300 s).
    daemon = Daemon(workdir, backends, args.pool_max, prefetch=prefetch, stager_delay=0,
                    fts=(fake, fts_settings), reconciler={}, extra=extra(backends) if extra else None)
    stack.callback(daemon.stop)
    stack.callback(step, f"stopping the daemon and the fake FTS, dropping database {backends.database}")
    daemon.start()
    step(f"transferd pid {daemon.process.pid} (port {daemon.port}, database {backends.database},"
         f" queue prefix {backends.prefix}), fake FTS pid {fake.process.pid} (port {fake.port})")
    return backends, fake, daemon


def _utc(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).replace(tzinfo=None)


def _epoch(moment):
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


WAITS = (  # (label, from column, to column) of the end-to-end wait figures
    ("queued for staging", "time_submitted", "time_staging"),
    ("staging", "time_staging", "time_staged"),
    ("queued + FTS submission", "time_staged", "time_transferring"),
    ("FTS + poll", "time_transferring", "time_success"),
    ("submit to SUCCESS", "time_submitted", "time_success"),
)


def end_to_end(args, work, root, prefetch, extra=None, label="", after=None):
    """Jobs per second from the first submission to the last SUCCESS: local stager, fake FTS finishing at once.

    extra(backends) -> more config sections; after(result, backends) runs before the daemon stops.
    """
    count = work["e2e"]
    with contextlib.ExitStack() as stack:
        workdir = os.path.join(root, f"e2e-prefetch-{prefetch}{label}")
        backends, fake, daemon = start_with_fts(args, stack, workdir, 0, prefetch, E2E_FTS, extra)
        watch = Watch(backends)
        stack.callback(watch.close)
        meter = CPUMeter(daemon.process.pid, fakefts=fake.process.pid)
        # Warm-up: a few jobs all the way through (connections, the FTS client's whoami), not measured.
        warm = E2E_CLIENTS
        drive(daemon.port, fts_requests(daemon, warm, "warm"), E2E_CLIENTS, {202})
        wait_for_jobs(watch, daemon, lambda c: c.get("SUCCESS", 0) >= warm, "the warm-up jobs", 60)
        time.sleep(1)
        requests = fts_requests(daemon, count, "copy")
        lines, fts_before = daemon.log_lines(), fake.requests()
        step(f"end to end, prefetch {prefetch}: {count} jobs at {E2E_CLIENTS} clients")
        statements_before = watch.statements_so_far()
        before, start = meter.sample(), time.time()
        submitter = Background(daemon.port, requests, E2E_CLIENTS, {202})
        wait_for_jobs(watch, daemon, lambda c: c.get("SUCCESS", 0) >= warm + count, f"{count} jobs to succeed",
                      timeout=120 + count / 5)
        cpu, wall = CPUMeter.seconds(before, meter.sample())
        statements, commits = (after - first for after, first in zip(watch.statements_so_far(), statements_before))
        submit_wall = submitter.join()[0]
        fts_after = fake.requests()
        columns = sorted({column for _, *pair in WAITS for column in pair})
        rows = watch.query(f"SELECT {', '.join(columns)} FROM jobs WHERE status = 'SUCCESS' AND time_submitted >= %s",
                           (_utc(start),))
        if len(rows) != count:
            raise RuntimeError(f"{len(rows)} measured jobs succeeded, not {count}")
        times = {column: [_epoch(row[i]) for row in rows] for i, column in enumerate(columns)}
        end = max(times["time_success"])
        waits = {label: sorted(b - a for a, b in zip(times[first], times[then])) for label, first, then in WAITS}
        result = types.SimpleNamespace(
            prefetch=prefetch, count=count, warm=warm, start=start, end=end, rate=count / (end - start),
            submit_rate=count / submit_wall,
            submit_wall=submit_wall, elapsed=end - start,
            last={state: max(times[column]) - start for state, column in
                  (("STAGED", "time_staged"), ("TRANSFERRING", "time_transferring"), ("SUCCESS", "time_success"))},
            waits=waits, daemon_ms=1000 * cpu["daemon"] / count,
            cpu_percent={name: 100 * seconds / wall for name, seconds in cpu.items()},
            log_lines=(daemon.log_lines() - lines) / count,
            statements=statements / count, commits=commits / count,
            fts={key: fts_after.get(key, 0) - fts_before.get(key, 0) for key in ("POST /jobs", "GET /jobs/{ids}")},
        )
        if after is not None:
            after(result, backends)
        return result


# -- events: webhooks and AMQP events on and off ------------------------------------------


class WebhookSink:
    """A webhook receiver in a thread: answers 204 at once, keeps each webhook-id and when it first arrived."""

    def __init__(self):
        import http.server

        sink = self
        self.first_seen = {}
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # connections kept open, as a production receiver does

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink.lock:
                    sink.first_seen.setdefault(self.headers.get("webhook-id"), time.time())
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 128  # the daemon opens up to 32 connections at once
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


def events_benchmark(args, work, root):
    """Section 8: end to end with events off, then on (one webhook subscriber, AMQP events), alternating."""
    sink = WebhookSink()
    secret = os.path.join(root, "webhook.secret")
    with open(secret, "w") as handle:
        handle.write("whsec_" + base64.b64encode(os.urandom(32)).decode() + "\n")
    exchange = f"bench-events-{uuid.uuid4().hex[:8]}"
    queue = f"{exchange}.all"
    connection = amqp_connect(args.amqp_url)  # closed at once: an idle blocking connection misses its heartbeats
    channel = connection.channel()
    channel.exchange_declare(exchange, exchange_type="topic", durable=True)
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, exchange, routing_key="job.#")
    connection.close()
    events_on = {"events": {"subscribers": f"bench {sink.url} {secret}", "exchange": exchange}}
    events_off = {"events": {"amqp": "false"}}
    results = []

    def webhooks_done(result, backends):
        """Wait for this run's SUCCESS webhooks (warm-up included); note when the last arrived."""
        expected = result.warm + result.count
        wait_until(lambda: sum(1 for moment in sink.first_seen.values() if moment >= result.start - 60) >= expected,
                   "every SUCCESS webhook", 120)
        result.webhook_lag = max(sink.first_seen.values()) - result.end

    try:
        for round_number in range(2):
            for mode, extra in (("off", events_off), ("on", events_on)):
                sink.first_seen.clear()
                step(f"events {mode}, round {round_number + 1}")
                result = end_to_end(args, work, root, EVENTS_PREFETCH, extra=lambda backends, extra=extra: extra,
                                    label=f"-events-{mode}-{round_number}",
                                    after=webhooks_done if mode == "on" else None)
                result.mode = mode
                result.webhooks = len(sink.first_seen)
                results.append(result)
                step(f"events {mode}: {result.rate:.1f} jobs/s, {result.webhooks} webhooks")
        connection = amqp_connect(args.amqp_url)
        amqp_messages = connection.channel().queue_declare(queue, passive=True).method.message_count
        connection.close()
    finally:
        sink.stop()
        with contextlib.suppress(Exception):
            connection = amqp_connect(args.amqp_url)
            channel = connection.channel()
            channel.queue_delete(queue)
            channel.exchange_delete(exchange)
            connection.close()
    report_events(results, amqp_messages)


def report_events(results, amqp_messages):
    _heading(f"8. Events: end to end with one webhook subscriber and AMQP events on, vs off, in one run"
             f" (goal: on >= {EVENTS_GOAL:.0%} of off)")
    print("""   as section 4 at prefetch 32; off: no subscriber, [events] amqp = false (the outbox rows are still written:
   they are part of each transition); on: one subscriber for the terminal states (a local HTTP receiver answering
   204 at once), every state published to a topic exchange with a durable queue bound to job.#
mode  round  jobs  jobs/s  daemon CPU ms/job  CPU% dmn   db   mq | webhooks  last webhook after last SUCCESS s""")
    for number, r in enumerate(results):
        lag = f"{r.webhook_lag:8.2f}" if r.mode == "on" else "       -"
        print(f"{r.mode:4s} {number // 2 + 1:6d} {r.count:5d} {r.rate:7.1f} {r.daemon_ms:18.2f}"
              f"      {_cpu(r.cpu_percent, ('daemon', 'mariadb', 'rabbitmq'))} | {r.webhooks:8d}  {lag}")
    off = statistics.mean(r.rate for r in results if r.mode == "off")
    on = statistics.mean(r.rate for r in results if r.mode == "on")
    print(f"\nMean jobs/s: off {off:.1f}, on {on:.1f}: on/off = {on / off:.3f} ({(1 - on / off):+.1%} fewer jobs/s;"
          f" goal at most {1 - EVENTS_GOAL:.0%}). AMQP messages in the bound queue: {amqp_messages}"
          f" (expected {sum(5 * (r.count + r.warm) for r in results if r.mode == 'on')}).", flush=True)


# -- the fleet: end to end with 1, 2 and 3 daemons sharing the database and the broker ----------------


def fleet_run(args, work, root, size):
    """End to end as section 4, with `size` daemons on one fresh database and queue prefix and one fake FTS.

    The clients spread their submissions over the daemons (as haproxy in front of them would); jobs/s is
    from the first measured submission to the last SUCCESS, counted in MySQL.
    """
    count = work["fleet"]
    with contextlib.ExitStack() as stack:
        workdir = os.path.join(root, f"fleet-{size}")
        backends = Backends(args.mysql_url, args.amqp_url)
        stack.callback(backends.close)
        fake = FakeFTS(workdir, 0)
        stack.callback(fake.stop)
        fake.start()
        daemons = []
        for number in range(size):
            daemon = Daemon(os.path.join(workdir, f"daemon-{number + 1}"), backends, args.pool_max,
                            prefetch=FLEET_PREFETCH, stager_delay=0, fts=(fake, E2E_FTS), reconciler={})
            stack.callback(daemon.stop)
            daemons.append(daemon)
        stack.callback(step, f"stopping {size} daemon(s) and the fake FTS, dropping database {backends.database}")
        for daemon in daemons:
            daemon.start()
        step(f"fleet of {size}: transferd pids {', '.join(str(d.process.pid) for d in daemons)}"
             f" (database {backends.database}, queue prefix {backends.prefix}), fake FTS pid {fake.process.pid}")
        watch = Watch(backends)
        stack.callback(watch.close)
        meter = CPUMeter(daemons[0].process.pid, fakefts=fake.process.pid,
                         **{f"daemon{number + 1}": d.process.pid for number, d in enumerate(daemons) if number})
        clients = [E2E_CLIENTS // size + (number < E2E_CLIENTS % size) for number in range(size)]
        # Warm-up: a few jobs through every daemon (connections, the FTS client's whoami), not measured.
        for daemon, share in zip(daemons, clients):
            drive(daemon.port, fts_requests(daemon, share, "warm"), share, {202})
        wait_for_jobs(watch, daemons, lambda c: c.get("SUCCESS", 0) >= E2E_CLIENTS, "the warm-up jobs", 60)
        time.sleep(1)
        requests = [fts_requests(daemon, count // size + (number < count % size), "copy")
                    for number, daemon in enumerate(daemons)]
        fts_before = fake.requests()
        step(f"fleet of {size}: {count} jobs at {E2E_CLIENTS} clients, spread over the daemons")
        before, start = meter.sample(), time.time()
        submitters = [Background(daemon.port, mine, share, {202})
                      for daemon, mine, share in zip(daemons, requests, clients)]
        wait_for_jobs(watch, daemons, lambda c: c.get("SUCCESS", 0) >= E2E_CLIENTS + count, f"{count} jobs to succeed",
                      timeout=120 + count / 5)
        cpu, wall = CPUMeter.seconds(before, meter.sample())
        submit_wall = max(submitter.join()[0] for submitter in submitters)
        fts_after = fake.requests()
        rows = watch.query("SELECT MAX(time_success), COUNT(*) FROM jobs WHERE status = 'SUCCESS'"
                           " AND time_submitted >= %s", (_utc(start),))
        end, succeeded = _epoch(rows[0][0]), rows[0][1]
        if succeeded != count:
            raise RuntimeError(f"{succeeded} measured jobs succeeded, not {count}")
        daemon_cpu = sum(seconds for name, seconds in cpu.items() if name.startswith("daemon"))
        percent = {name: 100 * seconds / wall for name, seconds in cpu.items()}
        return types.SimpleNamespace(
            size=size, count=count, rate=count / (end - start), submit_rate=count / submit_wall, elapsed=end - start,
            daemon_ms=1000 * daemon_cpu / count,
            daemon_percent=[percent["daemon"]] + [percent[f"daemon{n}"] for n in range(2, size + 1)],
            cpu_percent=percent,
            fts={key: fts_after.get(key, 0) - fts_before.get(key, 0) for key in ("POST /jobs", "GET /jobs/{ids}")},
        )


def fleet_benchmark(args, work, root):
    """Section 9: end to end with 1, 2 and 3 daemons on this machine, each size on a fresh database."""
    results = []
    for size in FLEET_SIZES:
        result = fleet_run(args, work, root, size)
        step(f"fleet of {size}: {result.rate:.1f} jobs/s")
        results.append(result)
    report_fleet(results)


def report_fleet(results):
    _heading("9. Fleet: end to end with 1, 2 and 3 daemons on this machine, sharing the database and the broker")
    print(f"""\
   as section 4 at prefetch {FLEET_PREFETCH}, each size on a fresh database and queue prefix with one fake FTS;
   {E2E_CLIENTS} clients spread their submissions over the daemons (as haproxy in front of them would)
   CPU% dmns = each daemon's share of one core; the machine has {os.cpu_count()} cores
daemons  jobs submit/s  jobs/s  x 1 daemon | SUCCESS s | daemons CPU ms/job  CPU% dmns        fts   db   mq  gen |\
 FTS POST/job  GET/job""")
    one = results[0].rate
    for r in results:
        daemons = "/".join(f"{p:.0f}" for p in r.daemon_percent)
        print(f"{r.size:7d} {r.count:5d} {r.submit_rate:8.0f} {r.rate:7.1f} {r.rate / one:11.2f} | {r.elapsed:9.1f} |"
              f" {r.daemon_ms:18.2f}  {daemons:>14s} {_cpu(r.cpu_percent, ('fakefts', 'mariadb', 'rabbitmq', 'loadgen'))} |"
              f" {r.fts['POST /jobs'] / r.count:12.2f} {r.fts['GET /jobs/{ids}'] / r.count:8.3f}")
    best = max(results, key=lambda r: r.rate)
    print(f"\nBest: {best.rate:.1f} jobs/s with {best.size} daemon(s), {best.rate / one:.2f} times one daemon's"
          f" {one:.1f} jobs/s.", flush=True)


def daemon_memory(args, work, root):
    """The daemon's RSS at idle, then with `rss` jobs TRANSFERRING, each polled at least twice."""
    count = work["rss"]
    interval = RSS_FTS["poll_interval"]
    with contextlib.ExitStack() as stack:
        workdir = os.path.join(root, "rss")
        # The fake FTS's files take 30 days: every job stays ACTIVE.
        backends, fake, daemon = start_with_fts(args, stack, workdir, 30 * 86400, RSS_PREFETCH, RSS_FTS)
        watch = Watch(backends)
        stack.callback(watch.close)
        pid = daemon.process.pid
        time.sleep(2)
        idle = memory_kib(pid)
        step(f"memory: {count} jobs to TRANSFERRING at {E2E_CLIENTS} clients")
        start = time.monotonic()
        submitter = Background(daemon.port, fts_requests(daemon, count, "copy"), E2E_CLIENTS, {202})
        wait_for_jobs(watch, daemon, lambda c: c.get("TRANSFERRING", 0) >= count, f"{count} jobs TRANSFERRING",
                      timeout=120 + count / 5, interval=0.5)
        filled = time.monotonic() - start
        submit_wall = submitter.join()[0]
        at_fill = memory_kib(pid)

        step("memory: waiting until the poller has covered every job, then once more")
        polled = polled_twice(watch, pid, count, interval, start, timeout=300)
        return types.SimpleNamespace(count=count, idle=idle, at_fill=at_fill, filled=filled, submit_wall=submit_wall,
                                     **vars(polled))


def polled_twice(watch, pid, count, interval, start, timeout, poll_every=0.2):
    """Wait until the poller has claimed every TRANSFERRING job once, then once more, and sample the daemon's
    RSS for 10 s: first_cover and second_cover (seconds from start), samples, final, polling_cpu."""

    def unpolled():
        return watch.query("SELECT COUNT(*) FROM jobs WHERE status = 'TRANSFERRING' AND poll_until IS NULL")[0][0]

    wait_until(lambda: unpolled() == 0, "every job polled once", timeout, interval=poll_every)
    first_cover = time.monotonic() - start
    mark = time.time()
    # poll_until = claim time + 0.9 interval: every job claimed again after `mark`.
    wait_until(lambda: watch.query("SELECT MIN(poll_until) FROM jobs WHERE status = 'TRANSFERRING'")[0][0]
               > mark + 0.9 * interval, "every job polled a second time", timeout, interval=poll_every)
    second_cover = time.monotonic() - start - first_cover
    time.sleep(2 * interval)  # the last claimed batch has been asked about and settled
    meter = CPUMeter(pid)
    before = meter.sample()
    samples = []
    for _ in range(20):
        samples.append(memory_kib(pid)["VmRSS"])
        time.sleep(0.5)
    cpu, wall = CPUMeter.seconds(before, meter.sample())
    final = memory_kib(pid)
    counts = watch.counts()
    if counts.get("TRANSFERRING", 0) != count:
        raise RuntimeError(f"jobs by status changed while measuring: {counts}")
    return types.SimpleNamespace(first_cover=first_cover, second_cover=second_cover, samples=samples, final=final,
                                 polling_cpu=100 * cpu["daemon"] / wall)


# -- the v1 API: batches and listings ---------------------------------------------------

V1_BATCH = 100  # jobs per POST /api/v1/jobs
V1_LEVELS = (1, 4, 16)  # concurrent clients posting batches
V1_BATCH_GOAL = 2.0  # batch jobs/s over the per-item raw floor
V1_LIST_ROWS = 1_000_000  # jobs in the table for the GET /api/v1/jobs latencies
V1_LIST_WARM = 100  # requests per listing shape sent, unmeasured, after the fill and before measuring
V1_LIST_GOAL_MS = 20.0  # p99


def _post_json(path, body):
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


def batch_requests(count, prefix):
    """count POST /api/v1/jobs requests of V1_BATCH jobs each, every job to its own davs:// destination.

    davs://, as FTS deliveries are: a file:// destination costs a realpath() of
    its directories on top (about 0.05 ms a job), to keep it under file_roots.
    """
    return [
        _post_json("/api/v1/jobs", {"jobs": [
            {"product_id": PRODUCT, "destination_path": f"davs://se.example.org:2880/data/{prefix}-{n}-{i}"}
            for i in range(V1_BATCH)]})
        for n in range(count)
    ]


def batch_throughput(daemon, backends, meter, work):
    """Jobs accepted per second in batches of V1_BATCH and the per-item floor at each concurrency, alternating.

    Returns ({clients: (Load, Floor)}, the floor at the clients where section 2 finds it highest).
    """
    results = {}
    for concurrency in V1_LEVELS:
        count = max(work["batches"] * concurrency // max(V1_LEVELS), 2 * concurrency)
        loads, floors = [], []
        for round_ in range(work["rounds"]):
            load = measure_http(daemon, meter, batch_requests(count + concurrency, f"b{concurrency}-{round_}"),
                                concurrency, {200})
            loads.append(load)
            floors.append(measure_floor(backends, meter, concurrency, min(count * V1_BATCH, work["submit"][64])))
        results[concurrency] = (_median(loads, "rate"), _median(floors, "sequence"))
    wide = max(LEVELS)
    floor = _median([measure_floor(backends, meter, wide, work["submit"][wide]) for _ in range(work["rounds"])],
                    "sequence")
    return results, floor


# Columns of the generated jobs (fill_jobs) and the SQL making each from seq, the row's number.
GENERATED = {
    # uuid4-like, as transferd's ids are: random, so a listing's rows lie all over the primary key
    "job_id": ("CONCAT(SUBSTR(h, 1, 8), '-', SUBSTR(h, 9, 4), '-4', SUBSTR(h, 14, 3), '-', SUBSTR('89ab', 1 + seq % 4, 1),"
               " SUBSTR(h, 18, 3), '-', SUBSTR(h, 21, 12))"),
    "product_id": "CONCAT('product-', seq)",
    "status": ("CASE WHEN seq % 1000 < 3 THEN 'SUBMITTED' WHEN seq % 1000 < 6 THEN 'STAGING'"
               " WHEN seq % 1000 < 8 THEN 'STAGED' WHEN seq % 1000 < 10 THEN 'TRANSFERRING'"
               " WHEN seq % 1000 < 20 THEN 'ERROR' WHEN seq % 1000 < 30 THEN 'CANCELLED' ELSE 'SUCCESS' END"),
    "detailed_status": "'generated'",
    "destination_path": "CONCAT('davs://se', seq % 20, '.example.org/data/product-', seq)",
    "destination_host": "CONCAT('se', seq % 20, '.example.org')",
    "submitter": "CONCAT('/DC=org/DC=example/CN=User ', seq % 100)",
    "label": "CONCAT('run-', seq DIV 1000)",
    "stage_attempts": "1",
    "time_submitted": "@start - INTERVAL (seq * 2) SECOND",
    "time_updated": "@start - INTERVAL (seq * 2) SECOND + INTERVAL 60 SECOND",
}


def fill_jobs(backends, total):
    """Fill the jobs table to `total` rows inside MariaDB (the seq engine), its secondary indexes built afterwards.

    Realistic spread: 97% SUCCESS, 1% ERROR, 1% CANCELLED, 1% active; 100 submitters, 20 destination hosts,
    a label per 1,000 jobs, one job every 2 s back from now, random job ids.  Returns the seconds it took,
    and the table's data and index sizes in bytes.
    """
    from transferd.store import schema
    from transferd.store.mysql import recount_jobs

    start = time.monotonic()
    connection = backends.connect()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT COUNT(*) FROM jobs")
        missing = total - cursor.fetchone()[0]
        indexes = list(schema.JOBS.indexes)
        cursor.execute("ALTER TABLE jobs " + ", ".join(f"DROP INDEX {index.name}" for index in indexes))
        cursor.execute("SET @start = UTC_TIMESTAMP(6) - INTERVAL 1 HOUR")
        cursor.execute(f"INSERT INTO jobs ({', '.join(GENERATED)}) SELECT {', '.join(GENERATED.values())}"
                       f" FROM (SELECT seq, MD5(CONCAT(seq, '-', RAND())) AS h FROM seq_1_to_{missing}) AS generated")
        connection.commit()
        cursor.execute("ALTER TABLE jobs " + ", ".join(
            f"ADD INDEX {index.name} ({', '.join(index.columns)})" for index in indexes))
        recount_jobs(cursor)  # the triggers appended a change per row: count afresh, as an upgrade does
        cursor.execute("ANALYZE TABLE jobs")
        cursor.fetchall()
        cursor.execute("SELECT data_length, index_length FROM information_schema.TABLES"
                       " WHERE table_schema = DATABASE() AND table_name = 'jobs'")
        sizes = cursor.fetchone()
        cursor.execute("SELECT @@innodb_buffer_pool_size")
        pool = cursor.fetchone()[0]
    finally:
        connection.close()
    return time.monotonic() - start, sizes, pool


def list_shapes(backends, rng, count):
    """(label, [request paths]) for each kind of listing measured, with random values and cursors."""
    from transferd.api_v1 import encode_cursor

    connection = backends.connect()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT time_submitted, job_id FROM jobs ORDER BY RAND() LIMIT %s", (count,))
        places = [encode_cursor(types.SimpleNamespace(time_submitted=moment.replace(tzinfo=datetime.timezone.utc),
                                                       job_id=job_id)) for moment, job_id in cursor.fetchall()]
    finally:
        connection.close()
    hour_ago = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    user = lambda: quote(f"/DC=org/DC=example/CN=User {rng.randrange(100)}")  # noqa: E731
    shapes = {
        "newest 100": lambda i: "",
        "after a random cursor": lambda i: f"cursor={places[i]}",
        "status=STAGING (0.3%)": lambda i: "status=STAGING",
        "status=SUCCESS, random cursor": lambda i: f"status=SUCCESS&cursor={places[i]}",
        "the 4 active states": lambda i: "status=SUBMITTED,STAGING,STAGED,TRANSFERRING",
        "submitter (1% each)": lambda i: f"submitter={user()}",
        "submitter, random cursor": lambda i: f"submitter={user()}&cursor={places[i]}",
        "submitter + status=ERROR": lambda i: f"submitter={user()}&status=ERROR",
        "label (1,000 jobs each)": lambda i: f"label=run-{rng.randrange(V1_LIST_ROWS // 1000)}",
        "destination_host (5%)": lambda i: f"destination_host=se{rng.randrange(20)}.example.org",
        "product_id": lambda i: f"product_id=product-{rng.randrange(1, V1_LIST_ROWS)}",
        "updated_after 2 h ago": lambda i: f"updated_after={hour_ago}",
    }
    return [(label, [_get("/api/v1/jobs?" + make(i)) for i in range(count)]) for label, make in shapes.items()]


# The list queries whose plans the report shows (query string -> JobFilter and cursor for list_query).
EXPLAINED = (
    ("(none)", {}, False),
    ("cursor=...", {}, True),
    ("status=STAGING", {"statuses": ("STAGING",)}, False),
    ("status=SUBMITTED,STAGING,STAGED,TRANSFERRING", {"statuses": ("SUBMITTED", "STAGING", "STAGED", "TRANSFERRING")},
     False),
    ("submitter=...&cursor=...", {"submitter": "/DC=org/DC=example/CN=User 7"}, True),
    ("submitter=...&status=ERROR", {"submitter": "/DC=org/DC=example/CN=User 7", "statuses": ("ERROR",)}, False),
    ("label=...", {"label": "run-17"}, False),
    ("destination_host=...", {"destination_host": "se3.example.org"}, False),
    ("product_id=...", {"product_id": "product-4711"}, False),
    ("updated_after=...", {"updated_after": datetime.datetime.now(datetime.timezone.utc)}, False),
)


def explain_list_queries(backends):
    """EXPLAIN of the statement the store runs for each listing in EXPLAINED: [(query string, plan rows)]."""
    from transferd import jobs
    from transferd.store.mysql import MySQLJobStore

    store = MySQLJobStore(None, None, None)  # only to build statements: no pool, no connection
    connection = backends.connect()
    plans = []
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT time_submitted, job_id FROM jobs ORDER BY time_submitted DESC LIMIT 500000, 1")
        middle = cursor.fetchone()
        for label, fields, paged in EXPLAINED:
            statement, params = store.list_query(jobs.JobFilter(**fields), 101, middle if paged else None)
            cursor.execute("EXPLAIN " + statement, params)
            names = [column[0] for column in cursor.description]
            plans.append((label, [dict(zip(names, row)) for row in cursor.fetchall()]))
    finally:
        connection.close()
    return plans


def time_job_counts(backends, runs=5):
    """/metrics' jobs by state (the store's count_by_status: job_counts and the changes not folded in yet) on the
    full table: (the EXPLAIN rows of its statement, the median seconds of runs runs, rows read, the counts)."""
    probe = StatementProbe(backends)
    try:
        timings = []
        for _ in range(runs):
            counts, statements, seconds, _wall = probe.run(lambda store: store.count_by_status())
            timings.append(seconds)
        (statement,) = statements
        plan = probe.explain(statement["query"], statement["params"])
    finally:
        probe.close()
    return plan, statistics.median(timings), statement["read"], counts


def v1_benchmark(args, work, root):
    """Section 6: the v1 API on MySQL and RabbitMQ: batch submissions against the per-item floor; listings of 1M jobs."""
    rng = random.Random(2)
    workdir = os.path.join(root, "v1")
    os.makedirs(workdir)
    with contextlib.ExitStack() as stack:
        backends, daemon = start_idle_daemon(args, stack, workdir, schemes="file, davs")
        meter = CPUMeter(daemon.process.pid)
        prepare_floor(backends)
        step(f"v1: batches of {V1_BATCH} and the per-item raw floor")
        batches, wide_floor = batch_throughput(daemon, backends, meter, work)
        accepted = backends.count_jobs()
        step(f"v1: filling the jobs table to {V1_LIST_ROWS} rows")
        filled = fill_jobs(backends, V1_LIST_ROWS)
        step("v1: GET /api/v1/jobs latencies")
        shapes = list_shapes(backends, rng, work["list"] + 1 + V1_LIST_WARM)
        for _, requests in shapes:  # one unmeasured pass: the indexes were just built, not read yet
            drive(daemon.port, requests[:V1_LIST_WARM], 1, {200})
        listings = [(label, measure_http(daemon, meter, requests[V1_LIST_WARM:], 1, {200})) for label, requests in shapes]
        plans = explain_list_queries(backends)
        job_counts = time_job_counts(backends)
        report_v1(batches, wide_floor, accepted, filled, listings, plans, memory_kib(daemon.process.pid), job_counts)


def report_v1(batches, wide_floor, accepted, filled, listings, plans, memory, job_counts):
    _heading(f"6. The v1 API: POST /api/v1/jobs, {V1_BATCH} jobs per request, vs the per-item raw floor"
             f" (goal {V1_BATCH_GOAL:g}x)")
    print(f"""\
   workers idle as in section 2; floor = INSERT+COMMIT then persistent publish+confirm, per item (as in section 2)
clients requests   jobs/s  p50 ms  p99 ms  daemon CPU ms/job  CPU% dmn  gen   db   mq |  floor/s | jobs/s / floor""")
    for concurrency, (load, floor) in batches.items():
        jobs_rate = load.rate * V1_BATCH
        print(f"{concurrency:7d} {load.count:8d} {jobs_rate:8.0f} {load.percentile(50):7.1f} {load.percentile(99):7.1f}"
              f" {load.daemon_ms / V1_BATCH:18.3f}      {_cpu(load.cpu_percent)} | {floor.sequence:8.0f} |"
              f" {jobs_rate / floor.sequence:14.2f}")
    print(f"{max(LEVELS):7d} {'':8s} {'':8s} {'':7s} {'':7s} {'':18s}      {'':19s} | {wide_floor.sequence:8.0f} |"
          f"  (floor only)")
    best_concurrency, (best, _) = max(batches.items(), key=lambda item: item[1][0].rate)
    best_floor = max([floor.sequence for _, floor in batches.values()] + [wide_floor.sequence])
    print(f"\nBest: {best.rate * V1_BATCH:.0f} jobs/s at {best_concurrency} client(s),"
          f" {best.rate * V1_BATCH / best_floor:.2f}x the best per-item floor of this run ({best_floor:.0f}/s);"
          f" the daemon used {best.cpu_percent['daemon']:.0f}% of a core, {best.daemon_ms / V1_BATCH:.3f} ms per job."
          f"\n{accepted} jobs accepted in all.")
    _heading(f"7. GET /api/v1/jobs with {V1_LIST_ROWS} jobs in the table (goal p99 < {V1_LIST_GOAL_MS:g} ms), 1 client")
    print(f"""\
   filled in {filled[0]:.0f} s inside MariaDB: data {_mib(filled[1][0] / 1024):.0f} MiB, indexes\
 {_mib(filled[1][1] / 1024):.0f} MiB, innodb_buffer_pool_size {_mib(filled[2] / 1024):.0f} MiB;
   limit=100 (the default); each shape with random values, measured after one unmeasured pass of {V1_LIST_WARM} requests per shape
listing                              requests  p50 ms  p90 ms  p99 ms  daemon CPU ms/req  CPU% dmn   db  goal""")
    for label, load in listings:
        met = "met" if load.percentile(99) < V1_LIST_GOAL_MS else "NOT met"
        print(f"{label:36s} {load.count:8d} {load.percentile(50):7.2f} {load.percentile(90):7.2f}"
              f" {load.percentile(99):7.2f} {load.daemon_ms:18.2f}      {_cpu(load.cpu_percent, ('daemon', 'mariadb'))}"
              f"  {met}")
    print("\nEXPLAIN of the statements behind them (the store's list_query, limit 101):")
    print("  (a deferred join: the subquery picks the page's rows from an index, then reads the 101 rows by seq,"
          " the primary key; its plan:)")
    for label, rows in plans:
        for row in rows:
            if row["select_type"] == "DERIVED":
                print(f"  {label:44s} type={row['type']} key={row['key']} rows={row['rows']} Extra={row['Extra']}")
    plan, seconds, read, counts = job_counts
    print(f"\n/metrics' jobs by state (count_by_status: the kept counts, job_counts, and the changes not folded"
          f" in yet), {sum(counts.values())} jobs: {seconds * 1000:.1f} ms (median of 5), {read} rows read; asked at"
          f" most every [metrics] job_counts_max_age s.")
    for row in plan:
        print(f"  EXPLAIN: table={row['table']} type={row['type']} key={row['key']} rows={row['rows']}"
              f" Extra={row['Extra']}")
    print(f"\nDaemon memory at the end: VmRSS {_mib(memory['VmRSS']):.1f} MiB, peak {_mib(memory['VmHWM']):.1f} MiB.",
          flush=True)


# -- the report -------------------------------------------------------------------


def _cpu(percent, names=("daemon", "loadgen", "mariadb", "rabbitmq")):
    return " ".join(f"{percent.get(name, float('nan')):4.0f}" for name in names)


def report(args, work, probe, submit, pair, small, full, log_lines, submitted, memory):
    load_average = " ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"""
transferd benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}{' --quick' if args.quick else ''}:\
 {os.cpu_count()} cores, load average {load_average} at the end
daemon: MySQL pool_max={args.pool_max or 'default'}, queue prefetch=1, stager delay=3600s
CPU% = percent of one core used by: daemon, load generator (this process), mariadbd, rabbitmq

1. Load-generator check: GET /transferStatus of unknown job ids (one primary-key read each)
clients requests    req/s  p50 ms  p99 ms  daemon CPU ms/req  loadgen CPU us/req  loadgen ceiling/s   CPU% dmn  gen   db   mq""")
    for concurrency, load in probe.items():
        print(f"{concurrency:7d} {load.count:8d} {load.rate:8.0f} {load.percentile(50):7.2f} {load.percentile(99):7.2f}"
              f" {load.daemon_ms:18.2f} {load.loadgen_us:19.0f} {1e6 / load.loadgen_us:18.0f}      {_cpu(load.cpu_percent)}")
    print(f"""
2. Submissions: POST /submitTransfer vs the raw floor at the same concurrency (median of {work['rounds']} round(s))
   floor = INSERT+COMMIT then persistent publish+confirm, per item, one MySQL and one AMQP connection per thread
clients requests daemon/s  p50 ms  p99 ms  daemon CPU ms/req  CPU% dmn  gen   db   mq |\
 insert/s publish/s serial/s  floor/s  CPU% gen   db   mq | daemon/floor""")
    for concurrency, (load, floor) in submit.items():
        print(f"{concurrency:7d} {load.count:8d} {load.rate:8.0f} {load.percentile(50):7.2f} {load.percentile(99):7.2f}"
              f" {load.daemon_ms:18.2f}      {_cpu(load.cpu_percent)} |"
              f" {floor.insert:8.0f} {floor.publish:9.0f} {floor.serial:8.0f} {floor.sequence:8.0f}     "
              f"{_cpu(floor.cpu_percent, ('loadgen', 'mariadb', 'rabbitmq'))} | {load.rate / floor.sequence:12.2f}")
    load, floor = pair
    print(f"""\
{max(LEVELS)} clients over two daemons sharing the database and the queues, {max(LEVELS) // 2} each (daemon CPU = both):
{max(LEVELS):7d} {load.count:8d} {load.rate:8.0f} {load.percentile(50):7.2f} {load.percentile(99):7.2f}\
 {load.daemon_ms:18.2f}      {_cpu(load.cpu_percent)} |\
 {floor.insert:8.0f} {floor.publish:9.0f} {floor.serial:8.0f} {floor.sequence:8.0f}     \
{_cpu(floor.cpu_percent, ('loadgen', 'mariadb', 'rabbitmq'))} | {load.rate / floor.sequence:12.2f}""")
    print(f"""
3. GET /transferStatus of random existing jobs: {SMALL_ROWS} jobs in the table vs {STATUS_ROWS}
clients requests  p50 ms  p99 ms  (with {SMALL_ROWS})  p50 ms  p99 ms  (with {STATUS_ROWS})  p50 ratio  p99 ratio  req/s""")
    for concurrency, load in full.items():
        before = small[concurrency]
        print(f"{concurrency:7d} {load.count:8d} {before.percentile(50):7.2f} {before.percentile(99):7.2f}"
              f" {'':11s} {load.percentile(50):7.2f} {load.percentile(99):7.2f} {'':14s}"
              f" {load.percentile(50) / before.percentile(50):9.2f} {load.percentile(99) / before.percentile(99):10.2f}"
              f" {load.rate:6.0f}")
    load, floor = submit[max(LEVELS)]
    print(f"""
At {max(LEVELS)} clients the daemon used {load.cpu_percent['daemon']:.0f}% of a core, {load.daemon_ms:.2f} ms of CPU per\
 submission: one process can do about {1000 / load.daemon_ms:.0f} submissions/s; the floor did {floor.sequence:.0f}/s.
The daemon logged {log_lines} lines for {submitted} submissions ({log_lines / submitted:.1f} per submission).
Its memory at the end: VmRSS {_mib(memory['VmRSS']):.1f} MiB, peak (VmHWM) {_mib(memory['VmHWM']):.1f} MiB.""", flush=True)


def _mib(kib):
    return kib / 1024


def _spread(values):
    """p50 / p90 / max of sorted values, in seconds."""
    def at(p):
        return values[min(len(values) - 1, int(p / 100 * len(values)))]
    return f"{at(50):6.2f} {at(90):6.2f} {values[-1]:6.2f}"


def _heading(title):
    load_average = " ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\n{title}, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}: load average {load_average}")


def report_e2e(results, pool_max):
    _heading(f"4. End to end: jobs/s from the first submission to the last SUCCESS (goal {THROUGHPUT_GOAL}/s)")
    print(f"""\
   local stager (delay 0, a {SMALL_PRODUCT_BYTES}-byte file, fsync'd), [transfer] backend = fts against
   `twistd -n transferd-fakefts --duration 0` (token auth, no --copy), [fts] poll_interval={E2E_FTS['poll_interval']}s\
 bulk_size={E2E_FTS['bulk_size']},
   MySQL pool_max={pool_max or 'default'}, reconciler defaults; {E2E_CLIENTS} clients submit; SUCCESS counted in MySQL
   last X s = seconds from the first submission to the last job reaching X; SQL/job and commits/job: the statements
   and commits the database server had from its clients over the run, the benchmark's own left out
prefetch  jobs submit/s  jobs/s  of goal | last STAGED s  TRANSFERRING s  SUCCESS s |\
 daemon CPU ms/job  CPU% dmn  fts   db   mq  gen | FTS POST/job  GET/job  log lines/job  SQL/job  commits/job""")
    for r in results:
        print(f"{r.prefetch:8d} {r.count:5d} {r.submit_rate:8.0f} {r.rate:7.1f} {r.rate / THROUGHPUT_GOAL:7.2f} |"
              f" {r.last['STAGED']:13.1f} {r.last['TRANSFERRING']:15.1f} {r.last['SUCCESS']:9.1f} |"
              f" {r.daemon_ms:17.2f}      {_cpu(r.cpu_percent, ('daemon', 'fakefts', 'mariadb', 'rabbitmq', 'loadgen'))} |"
              f" {r.fts['POST /jobs'] / r.count:12.2f} {r.fts['GET /jobs/{ids}'] / r.count:8.3f} {r.log_lines:14.1f}"
              f" {r.statements:8.1f} {r.commits:12.2f}")
    print("\nwaits per job, seconds: p50 p90 max")
    print("prefetch " + " ".join(f"{label:>22s}" for label, _, _ in WAITS))
    for r in results:
        print(f"{r.prefetch:8d} " + " ".join(f"{_spread(r.waits[label]):>22s}" for label, _, _ in WAITS))
    best = max(results, key=lambda r: r.rate)
    print(f"\nBest: {best.rate:.1f} jobs/s at prefetch {best.prefetch}, {best.rate / THROUGHPUT_GOAL:.2f} of the goal;"
          f" the daemon used {best.cpu_percent['daemon']:.0f}% of a core, {best.daemon_ms:.1f} ms of CPU per job"
          f" (one process: at most about {1000 / best.daemon_ms:.0f} jobs/s).", flush=True)


def report_memory(m):
    goal = RSS_GOAL_MIB

    def _row(label, memory):
        return (f"{label:44s} {_mib(memory['VmRSS']):9.1f} {_mib(memory['VmHWM']):10.1f} {_mib(memory['RssAnon']):12.1f}"
                f" {memory['Threads']:8d} {_mib(memory['VmRSS']) / goal:8.2f}")

    _heading(f"5. Daemon memory with {m.count} jobs TRANSFERRING (goal: at most {goal} MiB)")
    print(f"""\
   `twistd -n transferd-fakefts --duration {30 * 86400}` keeps every job ACTIVE; [queue] prefetch={RSS_PREFETCH},
   [fts] poll_interval={RSS_FTS['poll_interval']}s max_poll_interval={RSS_FTS['max_poll_interval']}s bulk_size={RSS_FTS['bulk_size']}; MiB = 1,048,576 bytes, from /proc/<pid>/status
when                                           VmRSS MiB  VmHWM MiB  RssAnon MiB  threads  of goal
{_row("idle, 2 s after start", m.idle)}
{_row(f"all {m.count} jobs TRANSFERRING", m.at_fill)}
{_row("... polled twice more, then 10 s", m.final)}

{m.count} submissions took {m.submit_wall:.1f} s ({m.count / m.submit_wall:.0f}/s); all TRANSFERRING after {m.filled:.1f} s;\
 every job polled once {m.first_cover - m.filled:.1f} s later, and again {m.second_cover:.1f} s after that.
VmRSS over the last 10 s: {_mib(min(m.samples)):.1f} to {_mib(max(m.samples)):.1f} MiB. Peak (VmHWM):\
 {_mib(m.final['VmHWM']):.1f} MiB, {_mib(m.final['VmHWM']) / goal:.2f} of the goal. Daemon CPU while only polling:\
 {m.polling_cpu:.0f}% of a core.""", flush=True)


# -- fair share: the scheduler on MariaDB and RabbitMQ, with the daemon in this process --------------------

FAIR_SLOTS = 20  # [limits] max_staging
FAIR_STAGING_SECONDS = 0.1  # each staging, in the benchmark's stager
FAIR_PREFETCH = 32  # [queue] prefetch: above FAIR_SLOTS, so that the workers can keep every slot busy
FAIR_BATCH = 100  # jobs per Pipeline.submit_many, as a POST /api/v1/jobs of section 6
FAIR_QUEUED = 10_000  # A's jobs, queued first
FAIR_LATE = 10  # B's jobs in run 1, once A holds every slot
FAIR_WEIGHTED = 2_000  # B's jobs in run 2
FAIR_WEIGHTS = {"A": 1, "B": 3}  # run 2's [scheduler] weights
FAIR_STEADY = 5.0  # seconds run 1 goes on after B's stagings end, timing passes with nearly FAIR_QUEUED waiting
FAIR_PASSES_GOAL = 2  # B's first job released by one of the first two releasing staging passes after it submits
FAIR_SHARE_GOAL = 0.10  # each share's slot share within 10% of its weight's


def _fair_services():
    """The stager and the mover of the fairness runs (made here: Twisted is imported only for this section)."""
    from twisted.application.service import Service
    from twisted.internet import defer
    from zope.interface import implementer

    from transferd.interfaces import IMover, IStager
    from transferd.jobs import StageResult, TransferResult

    @implementer(IStager)
    class SlowStager(Service):
        """Stages each job in FAIR_STAGING_SECONDS; keeps when each share took and gave back a slot."""

        timeout = 3600.0
        max_attempts = 3
        give_up_after = 86400.0
        batch_size = 1

        def __init__(self, reactor):
            self.reactor = reactor
            self.history = []  # (time, share, +1 or -1): a staging started or ended
            self.starts = []  # (time, share, job_id), in the order staging started
            self.held = {}  # share -> jobs staging now
            self.most = 0  # the most staging at once
            self.most_of = {}  # share -> the most it had staging at once
            self.ended = {}  # share -> its stagings ended

        def _change(self, share, change):
            self.history.append((self.reactor.seconds(), share, change))
            self.held[share] = self.held.get(share, 0) + change
            if change < 0:
                self.ended[share] = self.ended.get(share, 0) + 1

        def check(self, product_id):
            return defer.succeed(None)

        def stage(self, job, authcode):
            self.starts.append((self.reactor.seconds(), job.share, job.job_id))
            self._change(job.share, +1)
            self.most = max(self.most, sum(self.held.values()))
            self.most_of[job.share] = max(self.most_of.get(job.share, 0), self.held[job.share])
            done = defer.Deferred()

            def finish():
                self._change(job.share, -1)
                if not done.called:  # (abandoned when the daemon stopped)
                    done.callback(StageResult(success=True, staged_to="host", path=f"/staged/{job.job_id}"))

            self.reactor.callLater(FAIR_STAGING_SECONDS, finish)
            return done

        def still_staging(self, job):
            return defer.succeed(False)

        def cancel(self, job):
            return defer.succeed(None)

        def free_copy(self, job):
            return defer.succeed(None)

        def pollers(self, outcomes):
            return []

    @implementer(IMover)
    class InstantMover(Service):
        """Every transfer succeeds at once: the transfer step only clears the way."""

        schemes = frozenset({"file"})
        asynchronous = False
        timeout = None
        give_up_after = 3600.0

        def transfer(self, job):
            return defer.succeed(TransferResult(success=True, msg="done"))

        def cancel(self, job):
            return defer.succeed(None)

        def pollers(self, outcomes):
            return []

    return SlowStager, InstantMover


class PassClock:
    """Wraps store.schedule: each pass's step, start and end (reactor seconds) and the ids it released."""

    def __init__(self, store, reactor):
        self.passes = []
        self.watched = frozenset()  # job ids whose releases to staging are counted as they happen (cheap to wait for)
        self.watched_released = 0
        schedule = store.schedule

        def timed(step, *args, **kwargs):
            start = reactor.seconds()

            def ended(ids):
                self.passes.append(types.SimpleNamespace(step=step.name, start=start, end=reactor.seconds(),
                                                         ids=list(ids)))
                if step.name == "staging":
                    self.watched_released += sum(1 for job_id in ids if job_id in self.watched)
                return ids

            return schedule(step, *args, **kwargs).addCallback(ended)

        store.schedule = timed

    def releasing(self, since):
        """The staging passes that released jobs and ended after since, in order."""
        return [p for p in self.passes if p.step == "staging" and p.ids and p.end >= since]


def slot_shares(history, start, end):
    """(share -> its part of the staging slot-seconds held between start and end, slot-seconds in all)."""
    held, seconds, previous = {}, {}, None
    for moment, share, change in history + [(end, None, 0)]:
        if previous is not None:
            span = min(moment, end) - max(previous, start)
            if span > 0:
                for name, count in held.items():
                    seconds[name] = seconds.get(name, 0.0) + count * span
        if moment >= end:
            break
        previous = moment
        if share is not None:
            held[share] = held.get(share, 0) + change
    total = sum(seconds.values())
    return {name: value / total for name, value in seconds.items()} if total else {}, total


def most_held(history, start, end):
    """share -> the most slots it held at once between start and end (history: (time, share, +1 or -1))."""
    held, most = {}, {}
    for moment, share, change in history:
        if moment > end:
            break
        if moment >= start:
            for name, count in held.items():  # what it held when the window opened
                most.setdefault(name, count)
        held[share] = held.get(share, 0) + change
        if moment >= start:
            most[share] = max(most.get(share, 0), held[share])
    return most


async def _until(reactor, check, what, timeout, interval=0.005):
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + timeout
    while not check():
        if reactor.seconds() > deadline:
            raise RuntimeError(f"waited {timeout:.0f} s for {what}")
        await deferLater(reactor, interval, lambda: None)


async def _fair_submit(daemon, reactor, share, ids):
    """Jobs of share with these ids, in batches of FAIR_BATCH; fire with when the first batch was committed."""
    from transferd import jobs
    from transferd.auth.access import Identity

    identity, first = Identity(share, "token"), None
    for start in range(0, len(ids), FAIR_BATCH):
        batch = [jobs.Job(job_id=job_id, product_id=PRODUCT, destination_path="file:///fair/" + share,
                          submitter=share) for job_id in ids[start:start + FAIR_BATCH]]
        await daemon.pipeline.submit_many(batch, share, identity=identity)
        first = first if first is not None else reactor.seconds()
    return first


async def fair_run(args, root, reactor, made, label, late, weights=None):
    """A queues FAIR_QUEUED jobs; once A holds every staging slot (and has turned them over a few times), B
    submits `late`; waits until B's jobs have all been released (run 1: and staged).  On a fresh database and
    queue prefix, which it removes (made: gets the Backends, for a reactor stopped by a signal meanwhile)."""
    from transferd.config import load_config
    from transferd.jobs import new_job_id
    from transferd.wiring import build

    backends = Backends(args.mysql_url, args.amqp_url)
    made.append(backends)
    try:
        workdir = os.path.join(root, f"fairness-{label}")
        os.makedirs(workdir)
        settings = {
            ("api", "endpoint"): "tcp:0:interface=127.0.0.1", ("api", "access_log"): "false",
            ("database", "url"): backends.database_url(args.pool_max),
            ("queue", "url"): backends.queue_url(), ("queue", "prefetch"): str(FAIR_PREFETCH),
            ("stager", "archive_root"): workdir, ("stager", "staging_root"): workdir,
            ("events", "amqp"): "false",  # no exchange to leave behind; the outbox rows are still written
            ("limits", "max_staging"): str(FAIR_SLOTS),
        }
        if weights:
            settings[("scheduler", "weights")] = "\n".join(f"{w} {share}" for share, w in weights.items() if w != 1)
        config = load_config(None, settings)
        SlowStager, InstantMover = _fair_services()
        stager = SlowStager(reactor)
        daemon = build(config, reactor, stager=stager, mover=InstantMover())
        clock = PassClock(daemon.store, reactor)
        daemon.startService()
        try:
            await daemon.started
            step(f"fairness {label}: in-process daemon on database {backends.database}, queue prefix {backends.prefix};"
                 f" A submits {FAIR_QUEUED}")
            began = reactor.seconds()
            await _fair_submit(daemon, reactor, "A", [new_job_id() for _ in range(FAIR_QUEUED)])
            a_submitted = reactor.seconds()
            await _until(reactor, lambda: (sum(stager.held.values()) == FAIR_SLOTS
                                           and len(stager.starts) >= 3 * FAIR_SLOTS), "A to hold every staging slot", 60)
            step(f"fairness {label}: A holds {FAIR_SLOTS} slots ({len(stager.starts)} stagings so far);"
                 f" B submits {late}")
            mine = clock.watched = frozenset(new_job_id() for _ in range(late))
            before = reactor.seconds()
            committed = await _fair_submit(daemon, reactor, "B", sorted(mine))
            await _until(reactor, lambda: clock.watched_released >= late, f"B's {late} jobs to be released",
                         60 + late / 50)
            passes = clock.releasing(before)
            b_counts = [sum(1 for job_id in p.ids if job_id in mine) for p in passes]
            first_pass = next(n for n, count in enumerate(b_counts, 1) if count)
            all_pass = next(n for n in range(1, len(b_counts) + 1) if sum(b_counts[:n]) == late)
            last_release = passes[all_pass - 1].end
            staged_until = None
            if weights is None:  # run 1: B's staging ends too; then more passes, for their cost
                await _until(reactor, lambda: stager.ended.get("B", 0) == late, "B's stagings to end", 30)
                staged_until = max(moment for moment, share, change in stager.history if share == "B" and change < 0)
                step(f"fairness {label}: B's jobs staged; {FAIR_STEADY:g} s more of A alone, timing the passes")
                await _until(reactor, lambda: reactor.seconds() >= staged_until + FAIR_STEADY, "the passes", 60,
                             interval=0.1)
            ended = reactor.seconds()
            counts = await daemon.store.count_by_status()
        finally:
            await daemon.stopService()
    finally:
        backends.close()
    b_starts = [moment for moment, share, _ in stager.starts if share == "B"]
    shares, slot_seconds = slot_shares(stager.history, committed, last_release)
    # B's slots as the passes count them (released or staging), just after each pass from B's submission.
    b_ends = sorted(moment for moment, share, change in stager.history if share == "B" and change < 0)
    b_scheduled = max(sum(b_counts[:n]) - sum(1 for moment in b_ends if moment <= p.end)
                      for n, p in enumerate(passes, 1))
    return types.SimpleNamespace(
        label=label, late=late, weights=weights or {"A": 1, "B": 1}, a_submit=a_submitted - began,
        first_pass=first_pass, all_pass=all_pass, passes_after=passes, b_counts=b_counts,
        first_start=b_starts[0] - committed, all_released=last_release - committed,
        staged_until=None if staged_until is None else staged_until - committed,
        most_b=stager.most_of.get("B", 0), most=stager.most, b_scheduled=b_scheduled,
        most_in_window=most_held(stager.history, committed, last_release),
        shares=shares, window=last_release - committed, slot_seconds=slot_seconds,
        shares_staged=slot_shares(stager.history, committed, staged_until)[0] if staged_until else None,
        all_passes=[p for p in clock.passes if began <= p.start <= ended], elapsed=ended - began,
        a_submitted=a_submitted,
        waiting_left=counts.get("SUBMITTED", 0),
    )


def fairness_benchmark(args, root):
    """Section 10: fair share on MariaDB and RabbitMQ, the daemon in this process (wiring.build) with a slow
    stager: B's 10 jobs behind A's 10,000 (run 1, which also times the passes), then weights 1:3 (run 2).

    Runs the Twisted reactor in this process, once: run it last (main() does)."""
    from twisted.internet import defer, reactor
    from twisted.logger import LogLevel, globalLogBeginner, textFileLogObserver
    from twisted.python.failure import Failure

    logfile = open(os.path.join(root, "fairness.log"), "w")
    complaints = []  # warnings and errors the daemon logged: reported, as they may say a figure is wrong

    def complain(event):
        if event.get("log_level") is not None and event["log_level"] >= LogLevel.warn:
            complaints.append(event)

    globalLogBeginner.beginLoggingTo([textFileLogObserver(logfile), complain], redirectStandardIO=False)
    outcome, made = {}, []

    async def runs():
        one = await fair_run(args, root, reactor, made, "run 1", FAIR_LATE)
        two = await fair_run(args, root, reactor, made, "run 2", FAIR_WEIGHTED, weights=FAIR_WEIGHTS)
        return one, two

    def finished(result):
        outcome["result"] = result
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(runs()).addBoth(finished))
    reactor.run()  # its SIGINT and SIGTERM handlers stop it: then there is no outcome
    logfile.close()
    if "result" not in outcome:  # the run in progress never reached its clean-up
        step("interrupted: dropping the fairness runs' databases and queues")
        for backends in made:
            backends.close()
        raise KeyboardInterrupt
    result = outcome["result"]
    if isinstance(result, Failure):
        result.raiseException()
    report_fairness(*result, complaints)


def _percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def report_fairness(one, two, complaints):
    _heading(f"10. Fair share: {FAIR_LATE} jobs of B behind {FAIR_QUEUED} of A, then weights"
             f" {FAIR_WEIGHTS['A']}:{FAIR_WEIGHTS['B']} (goals: B's jobs start within {FAIR_PASSES_GOAL} scheduling"
             f" rounds; each share within {FAIR_SHARE_GOAL:.0%} of its weight)")
    print(f"""\
   the daemon in this process (wiring.build) on a fresh MariaDB database and RabbitMQ queue prefix per run, a stager
   staging each job in {FAIR_STAGING_SECONDS} s, a mover succeeding at once; [limits] max_staging = {FAIR_SLOTS},\
 [queue] prefetch = {FAIR_PREFETCH},
   [scheduler] defaults (queued_ahead 64, interval 1 s); A submits {FAIR_QUEUED} jobs ({FAIR_BATCH} per submit_many,\
 {one.a_submit:.1f} s in run 1),
   and once A holds every slot B submits; pass = a staging pass that released jobs, counted from B's submission;
   s = seconds from the commit of B's (first) batch; slot shares integrate the slots each share held over time""")
    print(f"""
run 1: B submits {one.late} jobs (weights 1:1)
first B released in pass  all B released by pass  first B staging s  all B released s  all B staged s |\
 B most staging  as the passes count  all at once
{one.first_pass:24d} {one.all_pass:23d} {one.first_start:18.3f} {one.all_released:16.3f} {one.staged_until:14.3f} |\
 {one.most_b:14d} {one.b_scheduled:19d} {one.most:11d}
B's of the jobs each releasing pass released, from B's submission:\
 {' '.join(f"{n}/{len(p.ids)}" for n, p in zip(one.b_counts[:one.all_pass], one.passes_after))}
slot shares at the stager while B had jobs waiting (to its last release, {one.window:.3f} s):\
 A {one.shares.get('A', 0):.3f}  B {one.shares.get('B', 0):.3f}
                  while B had jobs waiting or staging (to its last staging's end, {one.staged_until:.3f} s):\
 A {one.shares_staged.get('A', 0):.3f}  B {one.shares_staged.get('B', 0):.3f}""")
    total_weight = sum(two.weights.values())
    print(f"""
run 2: B submits {two.late} jobs; weights A {two.weights['A']}, B {two.weights['B']}; from B's first commit to its last\
 release, {two.window:.1f} s (B's first job released in pass {two.first_pass}, staging after {two.first_start:.3f} s)
share  weight   jobs  slot share  target  deviation  most slots  mean slots""")
    deviations = {}
    for share in ("A", "B"):
        target = two.weights[share] / total_weight
        got = two.shares.get(share, 0.0)
        deviations[share] = (got - target) / target
        print(f"{share:5s} {two.weights[share]:6g} {FAIR_QUEUED if share == 'A' else two.late:6d} {got:11.3f}"
              f" {target:7.3f} {deviations[share]:+10.1%} {two.most_in_window.get(share, 0):11d}"
              f" {got * two.slot_seconds / two.window:11.1f}")
    busy = two.slot_seconds / two.window
    rate = busy / FAIR_STAGING_SECONDS
    print(f"all   {'':6s} {'':6s} {1:11.3f} {1:7.3f} {'':10s} {two.most:11d} {busy:11.1f}"
          f"   (of max_staging {FAIR_SLOTS})")
    print(f"{rate:.0f} stagings/s; if the passes keep all {FAIR_SLOTS} slots taken, a slot waits"
          f" {(FAIR_SLOTS - busy) / rate:.3f} s between a staging's end and the next one's start"
          f" (released, queued, leased: counted, not at the stager)")
    print(f"""
pass cost in run 1 ({one.elapsed:.1f} s: A's submission, then B's, then {FAIR_STEADY:g} s of A alone; {FAIR_QUEUED}\
 jobs queued, {one.waiting_left} still SUBMITTED at the end): store.schedule, from the call to its result
step      when              passes  releasing  mean ms  p99 ms  max ms  jobs/releasing pass""")
    phases = (("A submitting", lambda p: p.start < one.a_submitted), ("after", lambda p: p.start >= one.a_submitted),
              ("all", lambda p: True))
    for name in ("staging", "transfer"):
        for when, belongs in phases:
            mine = [p for p in one.all_passes if p.step == name and belongs(p)]
            if not mine:
                continue
            times = [1000 * (p.end - p.start) for p in mine]
            releasing = [p for p in mine if p.ids]
            per = sum(len(p.ids) for p in releasing) / len(releasing) if releasing else 0
            print(f"{name:8s}  {when:16s} {len(mine):6d} {len(releasing):10d} {statistics.mean(times):8.1f}"
                  f" {_percentile(times, 99):7.1f} {max(times):7.1f} {per:20.1f}")
    rounds = max(one.first_pass, two.first_pass)
    print(f"\nB's jobs start within {FAIR_PASSES_GOAL} scheduling rounds:"
          f" {'met' if rounds <= FAIR_PASSES_GOAL else 'NOT met'}"
          f" (B's first job released by releasing pass {one.first_pass} in run 1, {two.first_pass} in run 2).")
    worst = max(abs(d) for d in deviations.values())
    print(f"Each active submitter's share within {FAIR_SHARE_GOAL:.0%} of its weight:"
          f" {'met' if worst <= FAIR_SHARE_GOAL else 'NOT met'}"
          f" (A {deviations['A']:+.1%}, B {deviations['B']:+.1%} of their targets).")
    if complaints:
        from twisted.logger import formatEvent
        print(f"The daemon logged {len(complaints)} warning(s) or error(s); the first: {formatEvent(complaints[0])}",
              flush=True)
    else:
        print("The daemon logged no warning or error.", flush=True)


# -- flat costs at a million jobs (section 11) --------------------------------------------------

SCALE_FLAT_GOAL = 0.10  # full-table figures within 10% of the empty table's: submissions' rate, status's p99
SCALE_PASS_GOAL_S = 1.0  # each periodic pass, with the big table
SCALE_LEVELS = (16, 64)  # clients submitting
SCALE_STATUS_CLIENTS = 16
SCALE_SUBMITTERS = 100  # the filled jobs' submitters, each its own share
# The active jobs' states, oldest first (the older a job, the further along it is).
SCALE_MIX = (("TRANSFERRING", 0.30), ("STAGED", 0.10), ("STAGING", 0.20), ("SUBMITTED", 0.40))
# [fts] poll_interval stays at its default, 30 s, as in production.  [limits] max_transfers_per_submitter = 1:
# every filled submitter holds transfers already, so the transfer passes count but release no STAGED job (the
# mover would otherwise turn them into TRANSFERRING during the measurement, which the empty table cannot).
SCALE_FTS = {"bulk_size": 100}
SCALE_LIMITS = {"max_transfers_per_submitter": 1}
SCALE_RSS_FTS = RSS_FTS  # every job every 1 s: the memory figure's jobs are polled as fast as the poller goes
# What a poll of a running job leaves in fts_details (FTSPoller._record_progress): the fake's answer for an
# ACTIVE one-file job.  Filled rows carry it, so the poller finds no progress to write, as in a steady state.
SCALE_FTS_DETAILS = '{"job_state": "ACTIVE", "files": [{"file_state": "ACTIVE"}]}'
FILL_CHUNK = 100_000  # rows per transaction when filling
FILLED_EVENTS = 1_000_000_000  # the filled outbox rows' event ids start above this
HANDLER_READS = ("Handler_read_first", "Handler_read_key", "Handler_read_last", "Handler_read_next",
                 "Handler_read_prev", "Handler_read_rnd", "Handler_read_rnd_next")


def fts_submit_jobs(fake, count, clients=16):
    """Submit count one-file jobs straight to the fake FTS (POST /jobs, the daemon's token); return their FTS ids.

    For jobs filled in SQL as TRANSFERRING: the fake knows them and keeps them ACTIVE (its long duration), so the
    poller asks about real FTS jobs instead of getting 404s (which it would report as "lost by FTS").
    """
    body = json.dumps({"files": [{"sources": ["gsiftp://stager.example.org/staging/bench/file"],
                                  "destinations": ["gsiftp://se.example.org/data/bench/file"]}]}).encode()
    request = (f"POST /jobs HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {FTS_TOKEN}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    ids = []

    async def client(share):
        reader, writer = await asyncio.open_connection("127.0.0.1", fake.port)
        try:
            for _ in range(share):
                writer.write(request)
                status, answer = await _read_response(reader)
                if status != 200:
                    raise RuntimeError(f"the fake FTS answered {status}: {answer[:300]!r}")
                ids.append(json.loads(answer)["job_id"])
        finally:
            writer.close()

    async def run():
        await asyncio.gather(*(client(count // clients + (n < count % clients)) for n in range(clients)))

    asyncio.run(run())
    return ids


# The columns of section 11's generated jobs, from seq (the row's number) and h (random hex); job_id from
# GENERATED (random, uuid4-like).  Finished jobs first (SCALE_FINISHED_COLUMNS), then the active ones.
_SCALE_COMMON = {
    "product_id": "CONCAT('product-', seq)",
    "destination_path": "CONCAT('davs://se', seq % 20, '.example.org/data/product-', seq)",
    "destination_host": "CONCAT('se', seq % 20, '.example.org')",
    "submitter": f"CONCAT('/DC=org/DC=example/CN=User ', seq % {SCALE_SUBMITTERS})",
    "share": f"CONCAT('/DC=org/DC=example/CN=User ', seq % {SCALE_SUBMITTERS})",
    "label": "CONCAT('run-', seq DIV 1000)",
    "stage_attempts": "1",
    "poll_slot": "CRC32(job_id) % 1024",  # schema.poll_slot: zlib.crc32 is MariaDB's CRC32
}
SCALE_FINISHED_COLUMNS = {
    **_SCALE_COMMON,
    "status": "CASE WHEN seq % 100 = 0 THEN 'ERROR' WHEN seq % 100 = 1 THEN 'CANCELLED' ELSE 'SUCCESS' END",
    "detailed_status": "'generated'",
    # One job every 2 s, back from the oldest active job: 1,000,000 jobs span 23 days, under [retention] keep.
    "time_submitted": "@oldest - INTERVAL (seq * 2) SECOND",
    "time_updated": "@oldest - INTERVAL (seq * 2) SECOND + INTERVAL 60 SECOND",
    "time_success": "CASE WHEN seq % 100 > 1 THEN @oldest - INTERVAL (seq * 2) SECOND + INTERVAL 60 SECOND END",
    "time_error": "CASE WHEN seq % 100 = 0 THEN @oldest - INTERVAL (seq * 2) SECOND + INTERVAL 60 SECOND END",
    "time_cancelled": "CASE WHEN seq % 100 = 1 THEN @oldest - INTERVAL (seq * 2) SECOND + INTERVAL 60 SECOND END",
}


def _scale_active_columns(bounds):
    """The active jobs' columns; bounds: {status: last seq}, the states in SCALE_MIX's order (seq 1: the oldest job).

    The leases as the daemon leaves them: TRANSFERRING waits for FTS (no owner, until time_transferring +
    [fts] transfer_timeout) and is polled (poll_until within the job's poll interval, as a poller that keeps up
    leaves it); STAGING waits for the stager (no owner, until 2 h after time_staging: not within the run);
    STAGED and SUBMITTED are free, for the scheduler (it releases them under a queue hold).
    """
    transferring = bounds.get("TRANSFERRING", 0)
    staged = bounds.get("STAGED", transferring)
    staging = bounds.get("STAGING", staged)
    status = "CASE " + " ".join(f"WHEN seq <= {last} THEN '{name}'" for name, last in bounds.items()) + " END"
    age = "(@active - seq)"  # seconds before now: seq 1 is the oldest
    recent = "(seq % 3600)"  # when the job entered its current state: within the last hour
    return {
        **_SCALE_COMMON,
        "status": status,
        "detailed_status": "NULL",
        "time_submitted": f"@start - INTERVAL {age} SECOND - INTERVAL 3600 SECOND",
        "time_updated": f"@start - INTERVAL {recent} SECOND",
        "time_staging": f"CASE WHEN seq <= {staging} THEN @start - INTERVAL {recent} SECOND - INTERVAL 600 SECOND END",
        "time_staged": f"CASE WHEN seq <= {staged} THEN @start - INTERVAL {recent} SECOND - INTERVAL 60 SECOND END",
        "time_transferring": f"CASE WHEN seq <= {transferring} THEN @start - INTERVAL {recent} SECOND END",
        "stager_path": f"CASE WHEN seq <= {staged} THEN CONCAT('/srv/staging/', job_id) END",
        "stager_hostname": f"CASE WHEN seq <= {staging} THEN 'stager.example.org' END",
        "fts_jobid": "fts.fts_jobid",
        "fts_details": f"CASE WHEN fts.fts_jobid IS NOT NULL THEN '{SCALE_FTS_DETAILS}' END",
        "lease_until": (f"CASE WHEN seq <= {transferring} THEN @now + 86400 - {recent}"
                        f" WHEN seq > {staged} AND seq <= {staging} THEN @now + 7200 - 600 - {recent} END"),
        "poll_owner": f"CASE WHEN seq <= {transferring} THEN 'fts-poller-filled' END",
        # Each job's poll due within its own interval (transferd.polling: longer for the older transfers).
        "poll_until": f"CASE WHEN seq <= {transferring} THEN @now - 3 + seq % ({_poll_interval_sql(recent)}) END",
    }


def default_fts_poller():
    """A Poller with [fts] poll_interval and max_poll_interval at their defaults: its interval() and hold()."""
    from transferd.config import SCHEMA
    from transferd.polling import Poller

    fts = SCHEMA["fts"]
    return Poller(None, None, None, None, float(fts["poll_interval"][1]), float(fts["max_poll_interval"][1]))


def _poll_interval_sql(age, ages=3600):
    """SQL for default_fts_poller().interval of `age`, an expression of whole seconds in [0, ages)."""
    interval = default_fts_poller().interval
    cases = []  # [last age, interval] of each run of ages with one interval
    for seconds in range(ages):
        if cases and cases[-1][1] == interval(seconds):
            cases[-1][0] = seconds
        else:
            cases.append([seconds, interval(seconds)])
    return "CASE " + " ".join(f"WHEN {age} <= {last} THEN {value:g}" for last, value in cases) + " END"


def fill_scale(backends, finished, active, fts_ids, mix=SCALE_MIX, events=True):
    """Add `finished` ended jobs and `active` active ones (states by mix) inside MariaDB (the seq engine).

    No daemon may run on the table meanwhile: with the indexes dropped, the reconciler's SELECT ... FOR UPDATE
    SKIP LOCKED scans the whole table, and meeting a large uncommitted insert it makes a lock struct for every
    row that insert holds; on 2026-12-03, with 1,000,000 rows in one transaction, that filled the 128 MiB buffer
    pool and MariaDB aborted ("Over 95 percent of the buffer pool is occupied by lock heaps").  Hence also the
    transactions of FILL_CHUNK rows.

    The TRANSFERRING jobs take the FTS ids fts_ids (as many as there are).  With events, every job also gets an
    outbox row (fanned out) and a delivered AMQP event_deliveries row, as a table the dispatcher has kept up
    with.  The jobs table's secondary indexes are built afterwards.  Returns (seconds, {status: count}).
    """
    from transferd.store import schema
    from transferd.store.mysql import recount_jobs

    start = time.monotonic()
    bounds, last = {}, 0
    for name, share in mix:
        last = active if name == mix[-1][0] else last + round(active * share)
        bounds[name] = last
    if len(fts_ids) != bounds.get("TRANSFERRING", 0):
        raise ValueError(f"{len(fts_ids)} FTS ids for {bounds.get('TRANSFERRING', 0)} TRANSFERRING jobs")
    job_id = GENERATED["job_id"]
    connection = backends.connect()
    try:
        cursor = connection.cursor()
        cursor.execute("CREATE TABLE bench_fts (n INT PRIMARY KEY, fts_jobid VARCHAR(64))")
        rows = list(enumerate(fts_ids, 1))
        for first in range(0, len(rows), BATCH):
            cursor.executemany("INSERT INTO bench_fts (n, fts_jobid) VALUES (%s, %s)", rows[first:first + BATCH])
        indexes = list(schema.JOBS.indexes)
        cursor.execute("ALTER TABLE jobs " + ", ".join(f"DROP INDEX {index.name}" for index in indexes))
        cursor.execute("SET @now = %s", (time.time(),))
        cursor.execute("SET @start = FROM_UNIXTIME(@now), @active = %s", (active + 1,))
        cursor.execute("SET @oldest = @start - INTERVAL (@active + 3600) SECOND")
        for count, columns, join in (
                (finished, SCALE_FINISHED_COLUMNS, ""),
                (active, _scale_active_columns(bounds), " LEFT JOIN bench_fts AS fts ON fts.n = seq")):
            names = ["job_id", *columns]
            for first in range(1, count + 1, FILL_CHUNK):  # transactions of FILL_CHUNK rows (see fill_scale)
                cursor.execute(
                    f"INSERT INTO jobs ({', '.join(names)}) SELECT job_id, {', '.join(columns.values())}"
                    f" FROM (SELECT seq, {job_id} AS job_id FROM (SELECT seq, MD5(CONCAT(seq, '-', RAND())) AS h"
                    f" FROM seq_{first}_to_{min(count, first + FILL_CHUNK - 1)}) AS random_hex) AS generated{join}")
                connection.commit()
        cursor.execute("DROP TABLE bench_fts")
        cursor.execute("ALTER TABLE jobs " + ", ".join(
            f"ADD INDEX {index.name} ({', '.join(index.columns)})" for index in indexes))
        recount_jobs(cursor)  # the triggers appended a change per row: count afresh, as an upgrade does
        if events:  # event ids above the daemon's own (its job_events rows), for the jobs without an outbox row
            cursor.execute("SELECT MAX(seq) FROM jobs")
            for first in range(0, cursor.fetchone()[0] or 0, FILL_CHUNK):
                ends = (FILLED_EVENTS + first, FILLED_EVENTS + first + FILL_CHUNK)
                cursor.execute("INSERT INTO outbox (event_id, job_id, state, fanned_out, time_created)"
                               " SELECT %s + seq, job_id, status, 1, time_updated FROM jobs WHERE seq > %s AND seq <= %s"
                               " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = jobs.job_id)",
                               (FILLED_EVENTS, first, first + FILL_CHUNK))
                cursor.execute("INSERT INTO event_deliveries (event_id, job_id, target, status, attempts,"
                               " next_attempt, time_done) SELECT event_id, job_id, 'amqp', 'delivered', 1,"
                               " COALESCE(UNIX_TIMESTAMP(time_created), @now), time_created FROM outbox"
                               " WHERE event_id > %s AND event_id <= %s", ends)
                connection.commit()
        for table in ("jobs", "outbox", "event_deliveries"):
            cursor.execute(f"ANALYZE TABLE {table}")
            cursor.fetchall()
        cursor.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        counts = dict(cursor.fetchall())
    finally:
        connection.close()
    return time.monotonic() - start, counts


class StatementProbe:
    """Runs store operations synchronously on a connection of our own, timing each statement and counting the
    rows it read; rolls every operation back, so the daemon's jobs stay as they were.

    The operations are the store's own methods (transferd.store.mysql.MySQLJobStore, which the daemon runs):
    the exact statements and parameters, built by the same code.  Rows read are the session's Handler_read_*
    counters (index entries and rows the storage engine handed up), read before and after each statement:
    they count only this connection's work, whatever else the shared server runs.
    """

    def __init__(self, backends):
        from MySQLdb.constants import CLIENT
        from transferd.store.mysql import MySQLJobStore

        # FOUND_ROWS: rowcount is rows matched, as the daemon's pool has it.
        self.connection = mysql_connect(backends.mysql_url, backends.database, client_flag=CLIENT.FOUND_ROWS)
        self.store = MySQLJobStore(None, None, types.SimpleNamespace(seconds=time.time))
        self.store._run = lambda interaction, *args, idempotent=True: interaction(_RecordingCursor(self), *args)
        self.statements = []

    def reads(self):
        cursor = self.connection.cursor()
        cursor.execute("SHOW SESSION STATUS WHERE Variable_name IN (" + ", ".join("%s" for _ in HANDLER_READS) + ")",
                       HANDLER_READS)
        return sum(int(value) for _, value in cursor.fetchall())

    def run(self, operation):
        """operation(store) -> its result (the store answers at once); returns (result, statements, seconds)."""
        self.statements = []
        started = time.perf_counter()
        try:
            result = operation(self.store)
        finally:
            self.connection.rollback()
        return result, self.statements, sum(statement["seconds"] for statement in self.statements), \
            time.perf_counter() - started

    def explain(self, query, params):
        """EXPLAIN rows of a statement (MariaDB explains UPDATE and DELETE too), as dicts."""
        cursor = self.connection.cursor()
        try:
            cursor.execute("EXPLAIN " + query, params)
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]
        finally:
            self.connection.rollback()

    def close(self):
        with contextlib.suppress(MySQLdb.Error):
            self.connection.close()


class _RecordingCursor:
    """The cursor an operation's interaction gets: executes on the probe's connection, recording each statement."""

    def __init__(self, probe):
        self.probe = probe
        self.cursor = probe.connection.cursor()
        self.rowcount, self.lastrowid, self.rows = -1, None, []

    def _timed(self, method, query, params):
        before = self.probe.reads()
        started = time.perf_counter()
        method(query, params)
        rows = list(self.cursor.fetchall()) if self.cursor.description else None
        seconds = time.perf_counter() - started
        read = self.probe.reads() - before
        self.rowcount, self.lastrowid, self.rows = self.cursor.rowcount, self.cursor.lastrowid, rows or []
        self.probe.statements.append(dict(query=query, params=params, seconds=seconds, read=read,
                                          rows=len(rows) if rows is not None else max(self.cursor.rowcount, 0),
                                          select=rows is not None))

    def execute(self, query, params=None):
        self._timed(self.cursor.execute, query, params)

    def executemany(self, query, params):
        self._timed(self.cursor.executemany, query, params)

    def fetchall(self):
        rows, self.rows = self.rows, []
        return rows

    def fetchone(self):
        return self.rows.pop(0) if self.rows else None


def periodic_operations():
    """(what, how often, operation(store)) of every query the daemon runs on a timer, with its settings here."""
    from transferd import jobs, leases
    from transferd.fleet import FORGET_AFTER, this_process
    from transferd.retention import BATCH as PURGE_BATCH, LOOKBACK, PAGE
    from transferd.scheduler import STAGING, TRANSFER, Limits, Policy, plan, room_for
    from transferd.store.outbox import Outbox
    from transferd.store.schema import POLL_SLOTS

    now = time.time()
    policy = Policy(limits=Limits(max_transfers_per_submitter=SCALE_LIMITS["max_transfers_per_submitter"]))
    info = this_process(types.SimpleNamespace(seconds=time.time))
    fts_hold = default_fts_poller().hold

    def scheduling_pass(step):
        return lambda store: store.schedule(step, lambda counts: plan(step, policy, counts),
                                            lambda room, host: room_for(room, host, policy.limits),
                                            leases.in_queue(30), info.daemon_id, hosts=False)

    return (
        ("reconciler: release_to_scheduler", "[reconciler] interval, 30 s",
         lambda store: store.release_to_scheduler((jobs.SUBMITTED, jobs.STAGED), 1000)),
        ("reconciler: jobs_to_redrive", "[reconciler] interval, 30 s",
         lambda store: store.jobs_to_redrive((jobs.STAGING, jobs.TRANSFERRING), 1000)),
        ("FTS poller: take_for_polling", "[fts] poll_interval, 30 s",
         lambda store: store.take_for_polling(jobs.TRANSFERRING, "fts-poller-bench", fts_hold, 1000,
                                              having="fts_jobid", slots=(0, POLL_SLOTS))),
        ("scheduler: fold of the counts' changes", "each counting pass; 1 s idle", lambda store: store.fold_job_counts()),
        ("scheduler: staging pass", "each commit (20 ms apart), 1 s idle", scheduling_pass(STAGING)),
        ("scheduler: transfer pass", "each commit (20 ms apart), 1 s idle", scheduling_pass(TRANSFER)),
        ("events: fan_out", "each commit, [events] sweep 10 s",
         lambda store: Outbox(store).fan_out(lambda state, url: ["amqp"])),
        ("events: claim (AMQP lane)", "each commit, [events] sweep 10 s",
         lambda store: Outbox(store).claim("bench-probe", 45.0, 200, targets=("amqp",), runs=True)),
        ("events: next_due", "after each sweep", lambda store: Outbox(store).next_due()),
        ("retention: purge_ended", "[retention] interval, 1 h",
         lambda store: store.purge_ended(jobs.utc_from_seconds(now - 180 * 86400), PURGE_BATCH)),
        ("retention: purge_submissions", "[retention] interval, 1 h",
         lambda store: store.purge_submissions(jobs.utc_from_seconds(now - 180 * 86400), PURGE_BATCH)),
        ("leftovers: ended jobs' page", "[retention] interval, 1 h (file roots)",
         lambda store: store.list_jobs(jobs.JobFilter(statuses=tuple(sorted(jobs.TERMINAL)),
                                                      updated_after=jobs.utc_from_seconds(now - 3600 - 60)), PAGE)),
        ("leftovers: at start-up (1 day back)", "once, at start",
         lambda store: store.list_jobs(jobs.JobFilter(statuses=tuple(sorted(jobs.TERMINAL)),
                                                      updated_after=jobs.utc_from_seconds(now - LOOKBACK)), PAGE)),
        ("metrics: count_by_status", "per scrape, at most every 5 s", lambda store: store.count_by_status()),
        ("fleet: beat", "[fleet] heartbeat, 5 s", lambda store: store.beat(info)),
        ("fleet: fleet", "[fleet] heartbeat, 5 s", lambda store: store.fleet(now - FORGET_AFTER)),
    )


def _shorten(query, width=110):
    """A statement for a table: placeholder lists collapsed, the select list elided, cut at width."""
    import re

    query = re.sub(r"\((?:%s, )+%s\)", "(...)", query)
    query = re.sub(r"^SELECT (?:jobs\.)?job_id, (?:jobs\.)?product_id, .*? FROM", "SELECT <job> FROM", query)
    query = re.sub(r"^SELECT d\.delivery_id, d\.target, .*? FROM", "SELECT <delivery> FROM", query)
    return query if len(query) <= width else query[:width - 3] + "..."


def _found(result):
    """How much work an operation's result says it found: jobs or rows returned, a count, counts summed."""
    if isinstance(result, (list, tuple)):
        return len(result)
    if isinstance(result, dict):  # counts: the groups counted, not the jobs in them
        return len(result)
    if isinstance(result, bool) or result is None:
        return int(bool(result))
    if isinstance(result, int):  # how many it released or removed
        return result
    return 1  # one value (next_due's time)


def probe_periodic(backends):
    """Each periodic operation once on the filled table: [(what, every, found, seconds, [statements with plans])]."""
    probe = StatementProbe(backends)
    results = []
    try:
        for what, every, operation in periodic_operations():
            probe.run(operation)  # once unmeasured: the pages it reads come into the buffer pool
            result, statements, seconds, _ = probe.run(operation)
            for statement in statements:
                statement["plan"] = probe.explain(statement["query"], statement["params"])
            results.append((what, every, _found(result), seconds, statements))
    finally:
        probe.close()
    return results


def _plan_text(rows):
    return "; ".join(f"{row['table']}: type={row['type']} key={row['key']} rows={row['rows']}"
                     + (f" {row['Extra']}" if row.get("Extra") else "") for row in rows)


def random_job_ids(backends, count):
    connection = backends.connect()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT job_id FROM jobs ORDER BY RAND() LIMIT %s", (count,))
        return [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()


def scale_costs(daemon, backends, meter, job_ids, work, rng):
    """Submissions at SCALE_LEVELS clients and /transferStatus of random existing jobs at 16, each `rounds` times
    (the median round by rate is kept): {label: Load}, each with disk_reads, InnoDB's page reads from disk per
    request (the server's Innodb_buffer_pool_reads: pages the buffer pool did not hold)."""
    connection = backends.connect()

    def measured(requests, concurrency, expected):
        before = _disk_reads(connection)
        load = measure_http(daemon, meter, requests, concurrency, expected)
        load.disk_reads = (_disk_reads(connection) - before) / load.count
        return load

    loads = {}
    try:
        for concurrency in SCALE_LEVELS:
            count = work["submit"][concurrency]
            rounds = [measured(fts_requests(daemon, count + concurrency, f"scale-{uuid.uuid4().hex[:8]}"), concurrency,
                               {202}) for _ in range(work["rounds"])]
            loads[f"submit {concurrency}"] = _median(rounds, "rate")
        clients = SCALE_STATUS_CLIENTS
        rounds = []
        for _ in range(work["rounds"]):
            requests = [_get(f"/transferStatus?job_id={rng.choice(job_ids)}") for _ in range(work["status"] + clients)]
            rounds.append(measured(requests, clients, {200}))
        loads[f"status {clients}"] = _median(rounds, "rate")
    finally:
        connection.close()
    return loads


def table_sizes(backends, largest=4):
    """[(table, MiB of data and indexes)] of the largest tables of the database, largest first (after ANALYZE)."""
    connection = backends.connect()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT table_name FROM information_schema.TABLES WHERE table_schema = %s", (backends.database,))
        names = [row[0] for row in cursor.fetchall()]
        cursor.execute("ANALYZE TABLE " + ", ".join(f"`{name}`" for name in names))
        cursor.fetchall()
        cursor.execute("SELECT table_name, (data_length + index_length) / 1048576 FROM information_schema.TABLES"
                       " WHERE table_schema = %s ORDER BY data_length + index_length DESC LIMIT %s",
                       (backends.database, largest))
        return [(name, float(mib)) for name, mib in cursor.fetchall()]
    finally:
        connection.close()


def _buffer_pool_mib(backends):
    connection = backends.connect()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT @@innodb_buffer_pool_size")
        return int(cursor.fetchone()[0]) / 2**20
    finally:
        connection.close()


def _disk_reads(connection):
    """The server's Innodb_buffer_pool_reads so far (the whole server's: quote it with the load)."""
    cursor = connection.cursor()
    cursor.execute("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_reads'")
    return int(cursor.fetchone()[1])


def scale_memory(args, work, root):
    """The daemon's RSS with scale_rss jobs TRANSFERRING, filled in SQL with FTS ids the fake FTS runs, polled twice."""
    count = work["scale_rss"]
    interval = SCALE_RSS_FTS["poll_interval"]
    with contextlib.ExitStack() as stack:
        workdir = os.path.join(root, "scale-rss")
        backends, fake, daemon = start_with_fts(args, stack, workdir, 30 * 86400, RSS_PREFETCH, SCALE_RSS_FTS)
        watch = Watch(backends)
        stack.callback(watch.close)
        pid = daemon.process.pid
        time.sleep(2)
        idle = memory_kib(pid)  # the process stopped for the fill: the second one's start is "none polled yet"
        step(f"scale memory: {count} jobs submitted to the fake FTS directly")
        started = time.monotonic()
        fts_ids = fts_submit_jobs(fake, count)
        fts_seconds = time.monotonic() - started
        step(f"scale memory: {count} TRANSFERRING jobs into the table, the daemon stopped (see fill_scale)")
        daemon.stop()
        fill_seconds, _ = fill_scale(backends, 0, count, fts_ids, mix=(("TRANSFERRING", 1.0),), events=False)
        connection = backends.connect()
        connection.cursor().execute("UPDATE jobs SET poll_owner = NULL, poll_until = NULL")  # none polled yet
        connection.commit()
        connection.close()
        daemon.start()
        start = time.monotonic()
        pid = daemon.process.pid
        at_fill = memory_kib(pid)

        step("scale memory: waiting until the poller has covered every job, then once more")
        polled = polled_twice(watch, pid, count, interval, start, timeout=120 + count / 20, poll_every=1)
        written = watch.query("SELECT COUNT(*) FROM jobs WHERE fts_details <> %s", (SCALE_FTS_DETAILS,))[0][0]
        return types.SimpleNamespace(count=count, idle=idle, at_fill=at_fill, fts_seconds=fts_seconds,
                                     fill_seconds=fill_seconds, written=written, interval=interval, **vars(polled))


def scale_benchmark(args, work, root):
    """Section 11: submissions and /transferStatus on an empty table and on a million finished jobs plus
    100,000 active ones, in one run; the periodic queries on the big table; RSS with 100,000 jobs polled."""
    rng = random.Random(11)
    finished, active = work["scale_finished"], work["scale_active"]
    transferring = round(active * SCALE_MIX[0][1])
    with contextlib.ExitStack() as stack:
        workdir = os.path.join(root, "scale")
        backends = Backends(args.mysql_url, args.amqp_url)
        stack.callback(backends.close)
        fake = FakeFTS(workdir, 30 * 86400)  # every FTS job stays ACTIVE
        stack.callback(fake.stop)
        fake.start()
        # Workers idle as in sections 1-3 (prefetch 1, an hour-long staging); reconciler, poller, scheduler,
        # heartbeat and events at their defaults: they run on the big table as in production.
        daemon = Daemon(workdir, backends, args.pool_max, fts=(fake, SCALE_FTS), reconciler={},
                        extra={"limits": SCALE_LIMITS})
        stack.callback(daemon.stop)
        stack.callback(step, f"stopping the daemon and the fake FTS, dropping database {backends.database}")
        daemon.start()
        step(f"transferd pid {daemon.process.pid} (port {daemon.port}, database {backends.database}),"
             f" fake FTS pid {fake.process.pid}")
        meter = CPUMeter(daemon.process.pid)
        step("scale: the empty table")
        small_ids = insert_finished_jobs(backends, SMALL_ROWS)
        # Unmeasured: the daemon's first requests (connections, caches) should not count against the empty table.
        drive(daemon.port, fts_requests(daemon, work["submit"][16], "warm"), 16, {202})
        drive(daemon.port, [_get(f"/transferStatus?job_id={rng.choice(small_ids)}") for _ in range(work["status"])],
              16, {200})
        empty_rows = backends.count_jobs()
        empty = scale_costs(daemon, backends, meter, small_ids, work, rng)
        step(f"scale: {transferring} jobs submitted to the fake FTS directly (for the TRANSFERRING ones)")
        fts_ids = fts_submit_jobs(fake, transferring)
        step("scale: stopping the daemon for the fill (see fill_scale)")
        daemon.stop()
        step(f"scale: filling the table with {finished} finished and {active} active jobs")
        fill_seconds, counts = fill_scale(backends, finished, active, fts_ids)
        full_rows = sum(counts.values())
        sizes = table_sizes(backends)
        step("scale: the same daemon (configuration, database, queues) started again on the full table")
        daemon.start()
        meter = CPUMeter(daemon.process.pid)
        step("scale: the full table")
        job_ids = random_job_ids(backends, 10_000)
        # One unmeasured pass: the indexes were just built, and the statuses asked about are spread over the table.
        drive(daemon.port, [_get(f"/transferStatus?job_id={job_id}") for job_id in job_ids[:2000]], 16, {200})
        full = scale_costs(daemon, backends, meter, job_ids, work, rng)
        step("scale: the periodic queries on the full table")
        periodic = probe_periodic(backends)
        memory_full = memory_kib(daemon.process.pid)
        alive = daemon.process.poll() is None
        pool_mib = _buffer_pool_mib(backends)
    step(f"scale: memory with {work['scale_rss']} jobs TRANSFERRING")
    memory = scale_memory(args, work, root)
    report_scale(work, empty, full, empty_rows, full_rows, counts, fill_seconds, periodic, memory, memory_full, alive,
                 pool_mib, sizes)


def report_scale(work, empty, full, empty_rows, full_rows, counts, fill_seconds, periodic, memory, memory_full,
                 alive, pool_mib, sizes):
    _heading(f"11. Flat costs at a million jobs: the same requests on an empty table and on {full_rows} jobs"
             f" (goals: within {SCALE_FLAT_GOAL:.0%}; each periodic pass under {SCALE_PASS_GOAL_S:g} s, reading"
             f" no more rows than it finds; RSS with {memory.count} jobs polled under {RSS_GOAL_MIB} MiB)")
    active = {status: count for status, count in counts.items() if status not in ("SUCCESS", "ERROR", "CANCELLED")}
    print(f"""\
   one daemon, workers idle (prefetch 1, staging delay 3600 s), [transfer] backend = fts against the fake FTS
   (--duration 30 days), reconciler, FTS poller (poll_interval 30 s), scheduler, heartbeat and events at their
   defaults, [limits] max_transfers_per_submitter = 1; full table filled inside MariaDB in {fill_seconds:.0f} s:
   {', '.join(f'{status} {count}' for status, count in sorted(counts.items()))}
   ({sum(active.values())} active: TRANSFERRING with FTS ids the fake runs; leases and poll columns as the daemon
   leaves them; one fanned-out outbox row and one delivered AMQP delivery per job)
   empty = {empty_rows} jobs ({SMALL_ROWS} finished, the rest an unmeasured warm-up's submissions); submissions:
   POST /submitTransfer (gsiftp destinations); status: GET /transferStatus of random existing jobs at {SCALE_STATUS_CLIENTS} clients;
   each the median of {work['rounds']} round(s) by rate; goal: submissions' rate, status's p99 within {SCALE_FLAT_GOAL:.0%}
   the full table's size at the server (MiB, data + indexes): {', '.join(f'{name} {mib:.0f}' for name, mib in sizes)}
measurement    requests |  empty req/s  p50 ms  p99 ms |   full req/s  p50 ms  p99 ms | rate full/empty  p99 full/empty\
  CPU ms/req empty full  disk reads/req empty full  goal""")
    for label, before in empty.items():
        after = full[label]
        rate, p99 = after.rate / before.rate, after.percentile(99) / before.percentile(99)
        # The issue's goal: submission throughput, and /transferStatus p99 (both ratios are printed).
        met = rate >= 1 - SCALE_FLAT_GOAL if label.startswith("submit") else p99 <= 1 + SCALE_FLAT_GOAL
        print(f"{label:14s} {after.count:8d} | {before.rate:12.0f} {before.percentile(50):7.2f}"
              f" {before.percentile(99):7.2f} | {after.rate:12.0f} {after.percentile(50):7.2f}"
              f" {after.percentile(99):7.2f} | {rate:15.2f} {p99:15.2f}  {before.daemon_ms:10.2f}"
              f" {after.daemon_ms:5.2f}  {before.disk_reads:20.2f} {after.disk_reads:5.2f}  {'met' if met else 'NOT met'}")
    print("   disk reads/req: pages InnoDB read from disk per request, the server's Innodb_buffer_pool_reads"
          f" (buffer pool {pool_mib:.0f} MiB)")
    print(f"""
Periodic queries on the full table: each operation is the store's own method (MySQLJobStore, the daemon's
code and statements), run once unmeasured and once measured on a connection of the benchmark's, then rolled
back; ms = the statements' time at the server and back; read = rows and index entries the engine read (the
session's Handler_read_* counters, this connection only); found = what the operation returns (jobs or rows
it takes, releases or returns; groups for a count); goal: under {SCALE_PASS_GOAL_S:g} s and read <= 3 x (found or rows out) + 10
operation                              every                                  ms   found    read  goal""")
    for what, every, found, seconds, statements in periodic:
        read = sum(statement["read"] for statement in statements)
        rows_out = sum(statement["rows"] for statement in statements)
        ok_time = seconds < SCALE_PASS_GOAL_S
        ok_rows = read <= 3 * max(found, rows_out) + 10
        verdict = "met" if ok_time and ok_rows else ("NOT met (rows)" if ok_time else "NOT met (time)")
        print(f"{what:38s} {every:36s} {1000 * seconds:6.1f} {found:7d} {read:7d}  {verdict}")
    print("\nEXPLAIN of each statement they ran (ms, rows out or changed, rows read):")
    for what, _, _, _, statements in periodic:
        print(f"  {what}")
        for statement in statements:
            print(f"    {1000 * statement['seconds']:7.1f} ms {statement['rows']:6d} out {statement['read']:7d} read"
                  f"  {_shorten(statement['query'])}")
            print(f"      {_plan_text(statement['plan'])}")
    m = memory
    goal = RSS_GOAL_MIB
    print(f"""
Daemon memory with {m.count} jobs TRANSFERRING, filled in SQL with the ids of {m.count} jobs submitted to the fake FTS
({m.fts_seconds:.0f} s) and polled: [fts] poll_interval={m.interval:g}s max_poll_interval={SCALE_RSS_FTS['max_poll_interval']}s\
 bulk_size={SCALE_RSS_FTS['bulk_size']}, at most\
 1000 jobs a cycle (FTSPoller.poll_limit)
when                                           VmRSS MiB  VmHWM MiB  RssAnon MiB  threads  of goal""")

    def _row(label, memory):
        return (f"{label:44s} {_mib(memory['VmRSS']):9.1f} {_mib(memory['VmHWM']):10.1f} {_mib(memory['RssAnon']):12.1f}"
                f" {memory['Threads']:8d} {_mib(memory['VmRSS']) / goal:8.2f}")

    print(_row("idle, 2 s after start", m.idle))
    print(_row("daemon restarted on them, none polled yet", m.at_fill))
    print(_row("... polled twice, then 10 s", m.final))
    print(f"""\
every job polled once {m.first_cover:.1f} s after the fill ({m.count / m.first_cover:.0f} jobs/s), and again\
 {m.second_cover:.1f} s after that; {m.written} job(s) had FTS progress written.
VmRSS over the last 10 s: {_mib(min(m.samples)):.1f} to {_mib(max(m.samples)):.1f} MiB; peak {_mib(m.final['VmHWM']):.1f}\
 MiB, {_mib(m.final['VmHWM']) / goal:.2f} of the goal ({'met' if _mib(m.final['VmHWM']) < goal else 'NOT met'}).\
 Daemon CPU while polling: {m.polling_cpu:.0f}% of a core.
The first daemon (the full table) ended at VmRSS {_mib(memory_full['VmRSS']):.1f} MiB, peak\
 {_mib(memory_full['VmHWM']):.1f} MiB{'' if alive else ' and had EXITED'}.""", flush=True)


# -- the soak (section 12) -----------------------------------------------------------------------

SOAK_CLIENTS = 32  # connections the paced submissions are spread over
SOAK_RECONNECT = 300  # seconds a client keeps a connection: the daemon closes those open 600 s ([api] connection_timeout)
SOAK_PREFETCH = 32
SOAK_TAIL = 10  # seconds the submissions go on after the last minute's line
SOAK_DRAIN = 120  # seconds to wait, after the last submission, for the last jobs to succeed
SOAK_WARM_MINUTE = 5  # flatness: the last minute against this one (or the middle one of a shorter soak)
SOAK_RSS_SLACK = 0.10  # RSS counts as flat within 10% of its warm value
SOAK_FD_SLACK = 10  # open fds: within 10 of the warm value
SOAK_LATE_S = 60.0  # a job taking longer than this from submission to SUCCESS counts as late


class PacedSubmitter:
    """Open-loop submissions in a thread: job i is sent at start + i / rate (whichever client is free), for
    `seconds`; counts accepted and refused ones and how far behind schedule the sends fell."""

    def __init__(self, daemon, rate, seconds, clients=SOAK_CLIENTS):
        self.daemon, self.rate, self.total = daemon, rate, int(rate * seconds)
        self.accepted = self.refused = self.sent = 0
        self.behind = 0.0  # seconds: the latest a send went out after its time
        self.latencies = []
        self.errors = []
        self.start = time.time()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run(clients)), daemon=True)
        self.thread.start()

    def _request(self, i):
        return _post_form("/submitTransfer", {
            "product_id": SMALL_PRODUCT,
            "destination_path": "gsiftp://localhost" + quote(os.path.join(self.daemon.deliveries, f"soak-{i}")),
        })

    async def _client(self):
        reader, writer = await asyncio.open_connection("127.0.0.1", self.daemon.port)
        opened = time.monotonic()
        try:
            while self.sent < self.total:
                if time.monotonic() - opened > SOAK_RECONNECT:  # before the daemon's [api] connection_timeout
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.daemon.port)
                    opened = time.monotonic()
                i = self.sent
                self.sent += 1
                delay = self.start + i / self.rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    self.behind = max(self.behind, -delay)
                began = time.perf_counter()
                writer.write(self._request(i))
                status, body = await _read_response(reader)
                self.latencies.append(time.perf_counter() - began)
                if status == 202:
                    self.accepted += 1
                else:
                    self.refused += 1
                    if len(self.errors) < 3:
                        self.errors.append(f"{status}: {body[:200]!r}")
        finally:
            writer.close()

    async def _run(self, clients):
        try:
            await asyncio.gather(*(self._client() for _ in range(clients)))
        except Exception as error:  # reported by join()
            self.errors.append(repr(error))

    def join(self, timeout=None):
        self.thread.join(timeout)


def _open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def soak_benchmark(args, root):
    """Section 12: end to end as section 4 at a steady open-loop rate for --soak-minutes; a line a minute."""
    minutes, rate = args.soak_minutes, args.soak_rate
    with contextlib.ExitStack() as stack:
        workdir = os.path.join(root, "soak")
        backends, fake, daemon = start_with_fts(args, stack, workdir, 0, SOAK_PREFETCH, E2E_FTS)
        watch = Watch(backends)
        stack.callback(watch.close)
        pid = daemon.process.pid
        warm = E2E_CLIENTS
        drive(daemon.port, fts_requests(daemon, warm, "warm"), E2E_CLIENTS, {202})
        wait_for_jobs(watch, daemon, lambda c: c.get("SUCCESS", 0) >= warm, "the warm-up jobs", 60)

        def connections():
            return watch.query("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = %s"
                               " AND ID <> CONNECTION_ID()", (backends.database,))[0][0]

        meter = CPUMeter(pid, fakefts=fake.process.pid)
        step(f"soak: {rate:g} jobs/s for {minutes} minute(s), {SOAK_CLIENTS} connections; a line a minute")
        # Submitting a little past the last minute's line, so that it is taken under load too.
        submitter = PacedSubmitter(daemon, rate, minutes * 60 + SOAK_TAIL)
        samples = []
        before = meter.sample()
        for minute in range(1, minutes + 1):
            time.sleep(max(0.0, submitter.start + 60 * minute - time.time()))
            if daemon.process.poll() is not None:
                raise RuntimeError(f"transferd exited with {daemon.process.returncode}:\n{daemon.log_tail()}")
            counts = watch.counts()
            now = meter.sample()
            cpu, wall = CPUMeter.seconds(before, now)
            before = now
            sample = types.SimpleNamespace(
                minute=minute, submitted=submitter.accepted, refused=submitter.refused,
                succeeded=counts.get("SUCCESS", 0) - warm, errors=counts.get("ERROR", 0),
                backlog=sum(n for status, n in counts.items() if status not in ("SUCCESS", "ERROR", "CANCELLED")),
                rss=memory_kib(pid)["VmRSS"], fds=_open_fds(pid), connections=connections(),
                cpu={name: 100 * seconds / wall for name, seconds in cpu.items()}, behind=submitter.behind)
            samples.append(sample)
            step(f"soak minute {minute}: {sample.submitted} submitted, {sample.succeeded} succeeded, backlog"
                 f" {sample.backlog}, RSS {_mib(sample.rss):.1f} MiB, {sample.fds} fds, {sample.connections} connections")
        submitter.join(SOAK_TAIL + 60)
        step("soak: waiting for the last jobs")
        deadline = time.monotonic() + SOAK_DRAIN
        while time.monotonic() < deadline:
            counts = watch.counts()
            if not sum(n for status, n in counts.items() if status not in ("SUCCESS", "ERROR", "CANCELLED")):
                break
            time.sleep(1)
        counts = watch.counts()
        rows = watch.query("SELECT status, TIMESTAMPDIFF(MICROSECOND, time_submitted, time_success) FROM jobs"
                           " WHERE destination_path LIKE %s", ("%/soak-%",))
        durations = sorted(micro / 1e6 for status, micro in rows if status == "SUCCESS")
        end = memory_kib(pid), _open_fds(pid), connections()
        report_soak(args, samples, submitter, rows, durations, counts, end)


def report_soak(args, samples, submitter, rows, durations, counts, end):
    minutes, rate = args.soak_minutes, args.soak_rate
    _heading(f"12. Soak: {rate:g} jobs/s for {minutes} minute(s), end to end (goals: RSS, fds and database"
             f" connections flat after warm-up; every job SUCCESS)")
    print(f"""\
   as section 4 (local stager, fake FTS finishing at once, [fts] poll_interval={E2E_FTS['poll_interval']}s,\
 prefetch {SOAK_PREFETCH}, reconciler defaults);
   open loop: job i is sent at start + i/{rate:g} s over {SOAK_CLIENTS} connections, until {SOAK_TAIL} s after the last\
 line; backlog = jobs not yet ended;
   connections = the daemon's sessions on its database (information_schema.PROCESSLIST)
minute  submitted  succeeded  backlog  ERROR |  RSS MiB  fds  db conns | CPU% dmn  fts   db   mq  gen | behind s""")
    for s in samples:
        print(f"{s.minute:6d} {s.submitted:10d} {s.succeeded:10d} {s.backlog:8d} {s.errors:6d} | {_mib(s.rss):8.1f}"
              f" {s.fds:4d} {s.connections:9d} |      {_cpu(s.cpu, ('daemon', 'fakefts', 'mariadb', 'rabbitmq', 'loadgen'))}"
              f" | {s.behind:8.2f}")
    memory, fds, connections = end
    warm = samples[min(SOAK_WARM_MINUTE, max(1, len(samples) // 2)) - 1]
    last = samples[-1]
    rss_flat = last.rss <= warm.rss * (1 + SOAK_RSS_SLACK)
    fds_flat = last.fds <= warm.fds + SOAK_FD_SLACK
    conns_flat = last.connections <= warm.connections
    growth = (_mib(last.rss) - _mib(warm.rss)) / max(1, last.minute - warm.minute) * 60
    print(f"""
After the warm-up (minute {warm.minute}) to the last minute ({last.minute}): RSS {_mib(warm.rss):.1f} -> {_mib(last.rss):.1f}\
 MiB ({growth:+.1f} MiB/hour at that pace; {'flat' if rss_flat else 'NOT flat'}: within {SOAK_RSS_SLACK:.0%}),
  open fds {warm.fds} -> {last.fds} ({'flat' if fds_flat else 'NOT flat'}: within {SOAK_FD_SLACK}),\
 database connections {warm.connections} -> {last.connections} ({'flat' if conns_flat else 'NOT flat'}: no more).
  After the drain: RSS {_mib(memory['VmRSS']):.1f} MiB (peak {_mib(memory['VmHWM']):.1f}), {fds} fds,\
 {connections} connections.""")
    succeeded = len(durations)
    submitted = submitter.accepted
    lost = submitted - succeeded
    others = {}
    for status, _ in rows:
        if status != "SUCCESS":
            others[status] = others.get(status, 0) + 1
    late = sum(1 for d in durations if d > SOAK_LATE_S)
    spread = (f"p50 {_percentile(durations, 50):.2f} s, p99 {_percentile(durations, 99):.2f} s,"
              f" max {durations[-1]:.2f} s" if durations else "none")
    print(f"""\
{submitted} jobs accepted ({submitter.refused} refused{'; ' + submitter.errors[0] if submitter.errors else ''}),\
 {succeeded} SUCCESS, {lost} not{(' (' + ', '.join(f'{s} {n}' for s, n in sorted(others.items())) + ')') if others else ''}:\
 {'no job lost' if lost == 0 else 'jobs LOST or unfinished'}.
Submit to SUCCESS: {spread}; {late} job(s) over {SOAK_LATE_S:g} s.\
 Sends fell at most {submitter.behind:.2f} s behind their schedule.""", flush=True)


# -- main -------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, under two minutes")
    parser.add_argument("--only", action="append", choices=SECTIONS + NAMED_ONLY,
                        help="run only this part (repeatable): backends (sections 1-3), e2e (4), rss (5), v1 (6-7),"
                             " events (8), fleet (9), fairness (10); and, only when named: scale (11), soak (12)")
    parser.add_argument("--prefetch", type=int, action="append",
                        help="end to end with this [queue] prefetch (repeatable; default 8 and 32, --quick 32)")
    parser.add_argument("--e2e-jobs", type=int, help="jobs per end-to-end run (default 2000, --quick 300)")
    parser.add_argument("--fleet-jobs", type=int, help="jobs per fleet run (default 2000, --quick 300)")
    parser.add_argument("--rss-jobs", type=int, help="jobs TRANSFERRING for the memory figure (default 10000)")
    parser.add_argument("--soak-minutes", type=int, default=30, help="how long the soak (section 12) runs (30)")
    parser.add_argument("--soak-rate", type=float, default=100, help="jobs/s the soak submits (100)")
    parser.add_argument("--pool-max", type=int, help="give the daemon this MySQL pool_max (default: its own default)")
    parser.add_argument("--mysql-url", default=MYSQL_URL, help=f"the MySQL server, without a database ({MYSQL_URL})".replace("%", "%%"))
    parser.add_argument("--amqp-url", default=AMQP_URL, help=f"the RabbitMQ server ({AMQP_URL})".replace("%", "%%"))
    parser.add_argument("--keep-workdir", action="store_true", help="keep the daemons' configs and logs")
    return parser.parse_args(argv)


def step(what):
    print(f"-- {what}", file=sys.stderr, flush=True)


def start_idle_daemon(args, stack, workdir, **options):
    """A fresh database and queue prefix and the daemon on them, its workers idle; the stack undoes all of it."""
    backends = Backends(args.mysql_url, args.amqp_url)
    stack.callback(backends.close)
    daemon = Daemon(workdir, backends, args.pool_max, **options)
    stack.callback(daemon.stop)
    stack.callback(step, "cleaning up: stopping the daemon, dropping the database and the queues")
    step(f"starting the daemon (database {backends.database}, queue prefix {backends.prefix})")
    daemon.start()
    step(f"the daemon runs as pid {daemon.process.pid} on port {daemon.port}")
    return backends, daemon


def backends_benchmark(args, work, root):
    """Sections 1 to 3: the API alone (workers idle) on MySQL and RabbitMQ, and the raw floor."""
    rng = random.Random(1)
    workdir = os.path.join(root, "backends")
    os.makedirs(workdir)
    with contextlib.ExitStack() as stack:
        backends, daemon = start_idle_daemon(args, stack, workdir)
        meter = CPUMeter(daemon.process.pid)
        step("load-generator check")
        probe = loadgen_check(daemon, meter, work)
        step(f"/transferStatus latency with {SMALL_ROWS} jobs")
        job_ids = insert_finished_jobs(backends, SMALL_ROWS)
        small = status_latency(daemon, meter, job_ids, work, rng)
        step("submissions and the raw floor")
        lines = daemon.log_lines()
        submit = submit_throughput(daemon, backends, meter, work)
        submitted, log_lines = backends.count_jobs() - SMALL_ROWS, daemon.log_lines() - lines
        step("a second daemon on the same database and queues; submissions spread over both")
        second = Daemon(os.path.join(workdir, "second"), backends, args.pool_max)
        stack.callback(second.stop)
        second.start()
        pair = submit_two_daemons((daemon, second), backends, CPUMeter(daemon.process.pid, daemon2=second.process.pid),
                                  work)
        second.stop()
        step(f"filling the jobs table to {STATUS_ROWS} rows")
        job_ids += insert_finished_jobs(backends, STATUS_ROWS - backends.count_jobs())
        step(f"/transferStatus latency with {STATUS_ROWS} jobs")
        full = status_latency(daemon, meter, job_ids, work, rng)
        report(args, work, probe, submit, pair, small, full, log_lines, submitted, memory_kib(daemon.process.pid))


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    work = dict(QUICK if args.quick else FULL)
    if args.prefetch:
        work["prefetch"] = tuple(args.prefetch)
    if args.e2e_jobs:
        work["e2e"] = args.e2e_jobs
    if args.rss_jobs:
        work["rss"] = args.rss_jobs
    if args.fleet_jobs:
        work["fleet"] = args.fleet_jobs
    sections = args.only or SECTIONS
    CPUMeter.server_ports = {"mariadb": urlsplit(args.mysql_url).port or 3306,
                             "rabbitmq": urlsplit(args.amqp_url).port or 5672}
    # Clean up on Ctrl-C and SIGTERM, even when started in the background (where SIGINT starts ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = tempfile.mkdtemp(prefix="transferd-bench-")
    started = time.monotonic()
    try:
        if "backends" in sections:
            backends_benchmark(args, work, root)
        if "e2e" in sections:
            report_e2e([end_to_end(args, work, root, prefetch) for prefetch in work["prefetch"]], args.pool_max)
        if "rss" in sections:
            report_memory(daemon_memory(args, work, root))
        if "v1" in sections:
            v1_benchmark(args, work, root)
        if "events" in sections:
            events_benchmark(args, work, root)
        if "fleet" in sections:
            fleet_benchmark(args, work, root)
        if "scale" in sections:
            scale_benchmark(args, work, root)
        if "soak" in sections:
            soak_benchmark(args, root)
        if "fairness" in sections:  # last: it runs the Twisted reactor in this process
            fairness_benchmark(args, root)
        print(f"\nThe whole run took {time.monotonic() - started:.0f} s.", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        # Each measurement has stopped its daemons and dropped its database and queues on its way out.
        if args.keep_workdir:
            print(f"the daemons' configs and logs are in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
