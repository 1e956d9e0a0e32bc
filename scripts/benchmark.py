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
import subprocess
import sys
import tempfile
import threading
import time
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

# How much work each measurement does.  Submissions and their floor are
# measured `rounds` times, alternating, and the median round is reported.
FULL = dict(rounds=3, submit={1: 400, 16: 2000, 64: 3000}, probe={1: 500, 16: 2000, 64: 3000}, status=2000)
QUICK = dict(rounds=1, submit={1: 100, 16: 400, 64: 640}, probe={1: 100, 16: 400, 64: 640}, status=400)


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
            connection.close()


# -- the daemon -----------------------------------------------------------------


class Daemon:
    """The real `twistd -n transferd`, in its own session so that Ctrl-C here does not reach it.

    The defaults keep the workers idle (see the config below); a measurement
    of whole transfers would pass prefetch=8, stager_delay=0.
    """

    def __init__(self, workdir, backends, pool_max=None, prefetch=1, stager_delay=3600):
        self.workdir = workdir
        self.port = _free_port()
        self.logfile = os.path.join(workdir, "transferd.log")
        self.deliveries = os.path.join(workdir, "deliveries")
        self.config = os.path.join(workdir, "transferd.ini")
        sample.create(os.path.join(workdir, "archive"))
        os.makedirs(self.deliveries)
        _write_config(self.config, {
            "api": {"endpoint": f"tcp:{self.port}:interface=127.0.0.1", "public_url": f"http://127.0.0.1:{self.port}"},
            "database": {"url": backends.database_url(pool_max)},
            # Prefetch 1 and an hour-long simulated tape recall: the staging
            # worker takes the first job and then waits, so the workers do no
            # database or broker work while submissions are measured.
            "queue": {"url": backends.queue_url(), "prefetch": prefetch},
            "stager": {
                "archive_root": os.path.join(workdir, "archive"),
                "staging_root": os.path.join(workdir, "staging"),
                "delay": stager_delay,
            },
            "transfer": {"allowed_schemes": "file", "file_roots": self.deliveries},
            # No reconciler pass (beyond the one at start) and no requeueing during the run.
            "reconciler": {"interval": 3600, "requeue_after": 3600},
        })
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
    """CPU used by the daemon, this process (the load generator), MariaDB and RabbitMQ.

    Tells which process was busy: the daemon is one Python process, so near
    100% of one core it is the bottleneck.  Servers on another host are
    simply not shown.
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
    def seconds(before, after):
        """({name: CPU seconds}, wall seconds) between two samples."""
        (start, t0), (end, t1) = before, after
        return {name: end[name] - start[name] for name in start}, t1 - t0


def _find_process(commands):
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as handle:
                if handle.read().strip() in commands:
                    return int(entry)
    return None


def _cpu_seconds(pid):
    """utime + stime of a process, all its threads included."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def _median(items, attribute):
    return sorted(items, key=lambda item: getattr(item, attribute))[len(items) // 2]


def status_latency(daemon, meter, job_ids, work, rng):
    """GET /transferStatus of random existing jobs, at 1 and 16 clients."""
    results = {}
    for concurrency in STATUS_LEVELS:
        requests = [_get(f"/transferStatus?job_id={rng.choice(job_ids)}") for _ in range(work["status"] + concurrency)]
        results[concurrency] = measure_http(daemon, meter, requests, concurrency, {200})
    return results


# -- the report -------------------------------------------------------------------


def _cpu(percent, names=("daemon", "loadgen", "mariadb", "rabbitmq")):
    return " ".join(f"{percent.get(name, float('nan')):4.0f}" for name in names)


def report(args, work, probe, submit, small, full, log_lines, submitted):
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
The daemon logged {log_lines} lines for {submitted} submissions ({log_lines / submitted:.1f} per submission).""", flush=True)


# -- main -------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, under a minute")
    parser.add_argument("--pool-max", type=int, help="give the daemon this MySQL pool_max (default: its own default)")
    parser.add_argument("--mysql-url", default=MYSQL_URL, help=f"the MySQL server, without a database ({MYSQL_URL})")
    parser.add_argument("--amqp-url", default=AMQP_URL, help=f"the RabbitMQ server ({AMQP_URL})")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the daemon's config and log")
    return parser.parse_args(argv)


def step(what):
    print(f"-- {what}", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    work = QUICK if args.quick else FULL
    rng = random.Random(1)
    # Clean up on Ctrl-C and SIGTERM, even when started in the background (where SIGINT starts ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = tempfile.mkdtemp(prefix="transferd-bench-")
    backends = daemon = None
    try:
        backends = Backends(args.mysql_url, args.amqp_url)
        daemon = Daemon(workdir, backends, args.pool_max)
        step(f"starting the daemon (database {backends.database}, queue prefix {backends.prefix})")
        daemon.start()
        step(f"the daemon runs as pid {daemon.process.pid} on port {daemon.port}")
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
        step(f"filling the jobs table to {STATUS_ROWS} rows")
        job_ids += insert_finished_jobs(backends, STATUS_ROWS - backends.count_jobs())
        step(f"/transferStatus latency with {STATUS_ROWS} jobs")
        full = status_latency(daemon, meter, job_ids, work, rng)
        report(args, work, probe, submit, small, full, log_lines, submitted)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        step("cleaning up: stopping the daemon, dropping the database and the queues")
        if daemon is not None:
            daemon.stop()
        if backends is not None:
            backends.close()
        if args.keep_workdir:
            print(f"the daemon's config and log are in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
