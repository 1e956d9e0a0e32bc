"""Benchmark transferd on its production backends: `.venv/bin/python scripts/benchmark.py [--quick]`.

Starts the real daemon (twistd) on a fresh MySQL database and a private
RabbitMQ queue prefix, drives its REST API from this process, measures the
same work done directly on MySQL and RabbitMQ (the raw floor), prints a table
of figures and removes everything it made.  docs/benchmarks.md explains the
figures.  The machine is small and shared, so compare the ratios printed by
one run rather than absolute rates across runs.
"""

import argparse
import asyncio
import contextlib
import datetime
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
import uuid
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

import MySQLdb
import pika

from transferd import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

MYSQL_URL = "mysql://root@127.0.0.1:3306/"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
# The adbapi pool size given to the daemon (?pool_max= in its database URL);
# docs/benchmarks.md shows why the default of 10 is not used.
POOL_MAX = 32

LEVELS = (1, 16, 64)
PRODUCT = "sample-001"
STATUS_ROWS = 100_000  # jobs in the table for the /transferStatus latency figures
BATCH = 5_000  # rows per executemany when filling the table
EMPTY_ROWS = 100  # "nearly empty": the jobs table before any load

# Work per measurement: requests per concurrency level, and /transferStatus requests.
FULL = dict(submit={1: 400, 16: 2000, 64: 3000}, probe={1: 500, 16: 2000, 64: 3000}, status=2000)
QUICK = dict(submit={1: 100, 16: 400, 64: 640}, probe={1: 100, 16: 400, 64: 640}, status=400)


# -- the backends -------------------------------------------------------------


def mysql_connect(server_url, database=""):
    """A plain mysqlclient connection, in a session set up as the daemon sets up its own."""
    parts = urlsplit(server_url)
    connection = MySQLdb.connect(
        host=parts.hostname or "127.0.0.1", port=parts.port or 3306, user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""), database=database, charset="utf8mb4", autocommit=False,
    )
    cursor = connection.cursor()
    cursor.execute("SET time_zone = '+00:00'")
    cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
    cursor.close()
    return connection


def _with_database(base_url, database):
    parts = urlsplit(base_url)
    return urlunsplit(parts._replace(path="/" + database))


def _with_options(url, **options):
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode(options)))


def amqp_connect(url):
    return pika.BlockingConnection(pika.URLParameters(url))


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
        self._execute(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4")

    def database_url(self, pool_max):
        return _with_options(_with_database(self.mysql_url, self.database), pool_max=pool_max)

    def queue_url(self):
        return _with_options(self.amqp_url, prefix=self.prefix)

    def connect(self):
        return mysql_connect(self.mysql_url, self.database)

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
            connection.close()


# -- the daemon -----------------------------------------------------------------


class Daemon:
    """The real `twistd -n transferd` in its own process group (Ctrl-C here does not reach it)."""

    def __init__(self, workdir, backends, pool_max):
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logfile = os.path.join(workdir, "transferd.log")
        self.deliveries = os.path.join(workdir, "deliveries")
        self.config = os.path.join(workdir, "transferd.ini")
        sample.create(os.path.join(workdir, "archive"))
        os.makedirs(self.deliveries)
        _write_config(self.config, {
            "api": {"endpoint": f"tcp:{self.port}:interface=127.0.0.1", "public_url": self.url},
            "database": {"url": backends.database_url(pool_max)},
            # prefetch 1 and an hour-long simulated tape recall: the staging
            # worker takes the first job and then waits, so the workers do no
            # database or broker work while submissions are measured.
            "queue": {"url": backends.queue_url(), "prefetch": 1},
            "stager": {
                "archive_root": os.path.join(workdir, "archive"),
                "staging_root": os.path.join(workdir, "staging"),
                "delay": 3600,
            },
            "transfer": {"allowed_schemes": "file", "file_roots": self.deliveries},
            # No reconciler pass (beyond the one at start) and no requeueing during the run.
            "reconciler": {"interval": 3600, "requeue_after": 3600},
        })
        self.process = None

    def start(self, timeout=60):
        self.process = subprocess.Popen(
            [TWISTD, "--pidfile=", "-n", "--logfile", self.logfile, "transferd", "--config", self.config],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.logfile + ".stderr", "w"),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transferd exited with {self.process.returncode}; see {self.logfile}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                status, _ = asyncio.run(_one_request(self.port, _get(f"/transferStatus?job_id={uuid.uuid4()}")))
                if status == 404:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"transferd did not answer within {timeout}s; see {self.logfile}")

    def stop(self, timeout=30):
        """SIGTERM, then SIGKILL.  A clean stop takes ~10 s: the queue waits for the held recall."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_lines(self):
        with open(self.logfile, errors="replace") as handle:
            return sum(1 for _ in handle)


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


# -- CPU accounting -------------------------------------------------------------


class CPUMeter:
    """CPU seconds used by the daemon, this process, MariaDB and RabbitMQ between start() and stop().

    Tells which process was busy: with 2 cores, a process near 100% of one is
    (or shares) the bottleneck.  Servers on another host are simply not shown.
    """

    def __init__(self, daemon_pid):
        self.pids = {"daemon": daemon_pid, "loadgen": os.getpid()}
        for name, commands in (("mariadb", ("mariadbd", "mysqld")), ("rabbitmq", ("beam.smp",))):
            pid = _find_process(commands)
            if pid is not None:
                self.pids[name] = pid

    def sample(self):
        return {name: _cpu_seconds(pid) for name, pid in self.pids.items()}, time.monotonic()

    @staticmethod
    def percent(before, after):
        """{name: percent of one core} between two samples."""
        (start, t0), (end, t1) = before, after
        return {name: 100 * (end[name] - start[name]) / (t1 - t0) for name in start}


def _find_process(commands):
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/comm") as handle:
                    if handle.read().strip() in commands:
                        return int(entry)
    return None


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the HTTP load generator ----------------------------------------------------
#
# A minimal HTTP/1.1 keep-alive client on asyncio streams: C coroutines, each
# with its own connection, sending pre-built requests one after the other.  It
# costs a small fraction of what the daemon spends per request (see the
# "loadgen" figures), so it is not what limits the measured rates.


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


async def _one_request(port, request):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await _read_response(reader)
    finally:
        writer.close()


async def _client(port, requests, expected, latencies):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for request in requests:
            start = time.perf_counter()
            writer.write(request)
            status, body = await _read_response(reader)
            latencies.append(time.perf_counter() - start)
            if status not in expected:
                raise RuntimeError(f"the daemon answered {status}: {body[:200]!r}")
    finally:
        writer.close()


def drive(port, requests, concurrency):
    """Send requests over `concurrency` connections; return (wall seconds, latencies, our CPU seconds)."""
    shares = [requests[i::concurrency] for i in range(concurrency)]
    expected = {200, 202, 404}
    latencies = []

    async def run():
        await asyncio.gather(*(_client(port, share, expected, latencies) for share in shares))

    cpu, start = time.process_time(), time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start, latencies, time.process_time() - cpu


class Load:
    """One HTTP measurement's figures."""

    def __init__(self, count, wall, latencies, loadgen_cpu, cpu):
        self.count = count
        self.rate = count / wall
        self.latencies = sorted(latencies)
        self.loadgen_us = 1e6 * loadgen_cpu / count  # our CPU per request
        self.cpu = cpu

    def percentile(self, p):
        return 1000 * self.latencies[min(len(self.latencies) - 1, int(p / 100 * len(self.latencies)))]


def measure_http(daemon, meter, requests, concurrency):
    """Warm up the connections' worth of requests, then time all of `requests`."""
    drive(daemon.port, requests[:concurrency], concurrency)
    before = meter.sample()
    wall, latencies, loadgen_cpu = drive(daemon.port, requests[concurrency:], concurrency)
    return Load(len(requests) - concurrency, wall, latencies, loadgen_cpu, CPUMeter.percent(before, meter.sample()))


def submit_requests(daemon, count):
    return [
        _post_form("/submitTransfer", {
            "product_id": PRODUCT,
            "destination_path": "file://" + quote(os.path.join(daemon.deliveries, f"copy-{i}")),
        })
        for i in range(count)
    ]


def status_requests(job_ids, count, rng):
    return [_get(f"/transferStatus?job_id={rng.choice(job_ids)}") for _ in range(count)]


# -- the raw floor: the same work without transferd ------------------------------


def _job_row(job_id):
    """The row store.create() inserts for a new job (same columns, same kinds of values)."""
    now = time.time()
    return (job_id, PRODUCT, "file:///srv/deliveries/copy", None, "SUBMITTED", 0, "queued", now + 300,
            datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(tzinfo=None))


INSERT_JOB = ("INSERT INTO {table} (job_id, product_id, destination_path, submitter, status, stage_attempts,"
              " lease_owner, lease_until, time_submitted) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)")


def _publish(channel, queue, job_id):
    """One persistent, mandatory publish, returning once RabbitMQ confirmed it (confirm mode)."""
    channel.basic_publish("", queue, job_id.encode(), pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent, content_type="text/plain"), mandatory=True)


def run_threads(concurrency, count, open_worker):
    """Run count items on `concurrency` threads, each with its own connections; return wall seconds.

    open_worker() -> (do(item), close()) runs in the worker thread, so every
    thread opens its own connections before the clock starts.
    """
    ready = threading.Barrier(concurrency + 1)
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
                do(item)
        except Exception as error:
            errors.append(error)
        finally:
            close()

    items = [str(uuid.uuid4()) for _ in range(count)]
    threads = [threading.Thread(target=worker, args=(items[i::concurrency],), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return wall


def floor_insert(backends, concurrency, count):
    """INSERT + COMMIT of job rows, one mysqlclient connection per thread."""

    def open_worker():
        connection = backends.connect()
        cursor = connection.cursor()
        query = INSERT_JOB.format(table="jobs_floor")

        def do(job_id):
            cursor.execute(query, _job_row(job_id))
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
        query = INSERT_JOB.format(table="jobs_floor")

        def do(job_id):
            cursor.execute(query, _job_row(job_id))
            database.commit()
            _publish(channel, backends.floor_queue, job_id)

        def close():
            database.close()
            broker.close()

        return do, close

    return count / run_threads(concurrency, count, open_worker)


def prepare_floor(backends):
    """A scratch copy of the jobs table and a scratch durable queue, so the daemon's stay untouched."""
    connection = backends.connect()
    connection.cursor().execute("CREATE TABLE jobs_floor LIKE jobs")
    connection.close()
    broker = amqp_connect(backends.amqp_url)
    broker.channel().queue_declare(backends.floor_queue, durable=True)
    broker.close()


class Floor:
    def __init__(self, insert, publish, sequence, cpu):
        self.insert, self.publish, self.sequence, self.cpu = insert, publish, sequence, cpu

    @property
    def serial(self):
        """The rate if each item waited for an insert, then for a publish, each at its own measured rate."""
        return 1 / (1 / self.insert + 1 / self.publish)


def measure_floor(backends, meter, concurrency, count):
    insert = floor_insert(backends, concurrency, count)
    publish = floor_publish(backends, concurrency, count)
    before = meter.sample()
    sequence = floor_sequence(backends, concurrency, count)
    return Floor(insert, publish, sequence, CPUMeter.percent(before, meter.sample()))


# -- filling the table ------------------------------------------------------------


def insert_finished_jobs(backends, count):
    """Add count finished (SUCCESS) jobs straight into the daemon's table; return their ids.

    Finished jobs, so neither the workers nor the reconciler ever look at them.
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
            cursor.executemany(query, rows)
            connection.commit()
    finally:
        connection.close()
    return job_ids


def count_jobs(backends):
    connection = backends.connect()
    try:
        cursor = connection.cursor()
        cursor.execute("SELECT COUNT(*) FROM jobs")
        return cursor.fetchone()[0]
    finally:
        connection.close()


# -- the measurements ---------------------------------------------------------------


def probe_ceiling(daemon, meter, work):
    """GET /transferStatus of unknown job ids: one primary-key read, the cheapest useful request."""
    results = {}
    for concurrency in LEVELS:
        requests = [_get(f"/transferStatus?job_id={uuid.uuid4()}") for _ in range(work["probe"][concurrency])]
        results[concurrency] = measure_http(daemon, meter, requests, concurrency)
    return results


def submit_throughput(daemon, backends, meter, work):
    """POST /submitTransfer at each concurrency, each followed at once by the raw floor at the same one."""
    prepare_floor(backends)
    results = {}
    for concurrency in LEVELS:
        count = work["submit"][concurrency]
        load = measure_http(daemon, meter, submit_requests(daemon, count + concurrency), concurrency)
        results[concurrency] = (load, measure_floor(backends, meter, concurrency, count))
    return results


def status_latency(daemon, meter, job_ids, work, rng):
    """p50/p99 of GET /transferStatus of random existing jobs, at 1 and 16 clients."""
    return {
        concurrency: measure_http(daemon, meter, status_requests(job_ids, work["status"] + concurrency, rng), concurrency)
        for concurrency in (1, 16)
    }


# -- the report -------------------------------------------------------------------


ALL_CPU = ("daemon", "loadgen", "mariadb", "rabbitmq")
FLOOR_CPU = ("loadgen", "mariadb", "rabbitmq")  # the daemon is idle during the floor


def _cpu(cpu, names=ALL_CPU):
    return " ".join(f"{cpu.get(name, float('nan')):4.0f}" for name in names)


def report(args, pool_max, probe, submit, empty, full, log_lines):
    say = print
    say()
    say(f"transferd benchmark, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
        f"{' (--quick)' if args.quick else ''}: {os.cpu_count()} cores, MySQL pool_max={pool_max},"
        " queue prefetch=1, stager delay=3600s")
    say("CPU columns: percent of one core used by daemon / load generator / mariadbd / rabbitmq")
    say()
    say("1. Load-generator check: GET /transferStatus of unknown job ids (one DB read)")
    say("clients  requests     req/s   p50 ms   p99 ms   loadgen us/req  loadgen ceiling/s   CPU% dmn gen  db  mq")
    for concurrency, load in probe.items():
        say(f"{concurrency:7d} {load.count:9d} {load.rate:9.0f} {load.percentile(50):8.2f} {load.percentile(99):8.2f}"
            f" {load.loadgen_us:16.0f} {1e6 / load.loadgen_us:19.0f}        {_cpu(load.cpu)}")
    say()
    say("2. Submissions: POST /submitTransfer vs the raw floor (INSERT+COMMIT then publish+confirm, same concurrency)")
    say("clients  requests  daemon/s   p50 ms   p99 ms  CPU% dmn gen  db  mq | insert/s publish/s"
        "  serial/s  floor/s  CPU% gen  db  mq | daemon/floor")
    for concurrency, (load, floor) in submit.items():
        say(f"{concurrency:7d} {load.count:9d} {load.rate:9.0f} {load.percentile(50):8.2f} {load.percentile(99):8.2f}"
            f"      {_cpu(load.cpu)} | {floor.insert:8.0f} {floor.publish:9.0f} {floor.serial:9.0f}"
            f" {floor.sequence:8.0f}     {_cpu(floor.cpu, FLOOR_CPU)} | {load.rate / floor.sequence:12.2f}")
    say()
    say(f"3. GET /transferStatus of random existing jobs: latency with {EMPTY_ROWS} vs {STATUS_ROWS} jobs in the table")
    say("clients  requests  p50 ms (small)  p99 ms (small)  p50 ms (full)  p99 ms (full)  p50 ratio  p99 ratio  req/s (full)")
    for concurrency in empty:
        small, large = empty[concurrency], full[concurrency]
        say(f"{concurrency:7d} {large.count:9d} {small.percentile(50):15.2f} {small.percentile(99):15.2f}"
            f" {large.percentile(50):14.2f} {large.percentile(99):14.2f}"
            f" {large.percentile(50) / small.percentile(50):10.2f} {large.percentile(99) / small.percentile(99):10.2f}"
            f" {large.rate:13.0f}")
    say()
    say(f"daemon log lines written during the run: {log_lines}")


# -- main -------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    parser.add_argument("--pool-max", type=int, default=POOL_MAX, help=f"the daemon's MySQL pool_max (default {POOL_MAX})")
    parser.add_argument("--mysql-url", default=MYSQL_URL, help=f"MySQL server, no database (default {MYSQL_URL})")
    parser.add_argument("--amqp-url", default=AMQP_URL, help=f"RabbitMQ (default {AMQP_URL})")
    parser.add_argument("--keep-log", action="store_true", help="keep the work directory with the daemon's log")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    work = QUICK if args.quick else FULL
    rng = random.Random(1)
    # SIGTERM cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = tempfile.mkdtemp(prefix="transferd-bench-")
    backends = daemon = None
    try:
        backends = Backends(args.mysql_url, args.amqp_url)
        daemon = Daemon(workdir, backends, args.pool_max)
        step("starting the daemon")
        daemon.start()
        meter = CPUMeter(daemon.process.pid)
        step("load-generator check")
        probe = probe_ceiling(daemon, meter, work)
        step(f"/transferStatus latency, {EMPTY_ROWS} jobs")
        job_ids = insert_finished_jobs(backends, EMPTY_ROWS)
        empty = status_latency(daemon, meter, job_ids, work, rng)
        step("submissions and the raw floor")
        submit = submit_throughput(daemon, backends, meter, work)
        step(f"filling the table to {STATUS_ROWS} jobs")
        job_ids += insert_finished_jobs(backends, STATUS_ROWS - count_jobs(backends))
        step(f"/transferStatus latency, {STATUS_ROWS} jobs")
        full = status_latency(daemon, meter, job_ids, work, rng)
        report(args, args.pool_max, probe, submit, empty, full, daemon.log_lines())
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        step("cleaning up")
        if daemon is not None:
            daemon.stop()
        if backends is not None:
            backends.close()
        if args.keep_log:
            print(f"daemon log kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def step(what):
    print(f"-- {what}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
