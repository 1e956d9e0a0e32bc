"""The real twistd, given a bad value for any configuration key, exits non-zero with one line naming it.

Each case is a value an operator could write by mistake, with the other
keys that make it matter (backend = taperest for [stager] token_file, say).
The daemons run as subprocesses, eight at a time.
"""

import concurrent.futures
import os
import subprocess
import sys

from twisted.trial import unittest

from transferd.config import SCHEMA, load_config

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

# Every case runs on top of this; "{w}" is the working directory (archive/, plain, cert.pem, token).
BASE = {
    ("api", "endpoint"): "tcp:0:interface=127.0.0.1",
    ("database", "url"): "sqlite:///{w}/jobs.sqlite",
    ("stager", "archive_root"): "{w}/archive",
    ("stager", "staging_root"): "{w}/staging",
}
TAPE = {("stager", "backend"): "taperest", ("stager", "url"): "https://tape.example.org",
        ("stager", "archive_root"): "/pnfs/example.org/meerkat"}
FTS = {("transfer", "backend"): "fts", ("transfer", "allowed_schemes"): "davs",
       ("fts", "endpoint"): "https://fts.example.org:8446", ("fts", "auth"): "token", ("fts", "token_file"): "{w}/token"}
TLS = {("api", "tls_cert"): "{w}/cert.pem"}

# (section, key) -> (the settings that make it matter, a bad value)
CASES = {
    ("api", "endpoint"): ({}, "tcp:http"),
    ("api", "public_url"): ({}, "ftp://transferd.example.org"),
    ("api", "max_body_bytes"): ({}, "lots"),
    ("api", "max_batch"): ({}, "0"),
    ("api", "max_batch_bytes"): ({}, "16 MB"),
    ("api", "max_header_bytes"): ({}, "0"),
    ("api", "idle_timeout"): ({}, "-1"),
    ("api", "connection_timeout"): ({}, "soon"),
    ("api", "max_connections_per_peer"): ({}, "0"),
    ("api", "tls_cert"): ({}, "{w}/no-such-cert.pem"),
    ("api", "tls_key"): (TLS, "{w}/no-such-key.pem"),
    ("api", "access_log"): ({}, "sometimes"),
    ("auth", "x509_ca_path"): (TLS, "{w}/no-such-ca"),
    ("auth", "voms_dir"): ({}, "{w}/no-such-vomsdir"),
    ("auth", "token_issuers"): ({}, "https://iam.example.org/"),
    ("auth", "token_audiences"): ({}, "https://transferd.example.org https://other.example.org"),
    ("auth", "jwks_refresh"): ({}, "0"),
    ("auth", "admins"): ({}, "CN=Archive Operator,O=Example"),
    ("auth", "stager_dns"): ({}, "CN=stager.example.org"),
    ("auth", "audit_log"): ({}, "{w}/no-such-dir/audit.log"),
    ("database", "url"): ({}, "postgres://db.example.org/transferd"),
    ("queue", "url"): ({}, "kafka://broker.example.org"),
    ("queue", "prefetch"): ({}, "0"),
    ("queue", "max_deliveries"): ({}, "many"),
    ("stager", "backend"): ({}, "tape"),
    ("stager", "archive_root"): ({}, "{w}/no-such-archive"),
    ("stager", "staging_root"): ({}, "{w}/plain/staging"),
    ("stager", "delay"): ({}, "-1"),
    ("stager", "timeout"): ({}, "0"),
    ("stager", "max_attempts"): ({}, "0"),
    ("stager", "give_up_after"): ({}, "a day"),
    ("stager", "url"): ({}, "ftp://stager.example.org/stage"),
    ("stager", "retry_delay"): ({}, "0"),
    ("stager", "bulk_size"): ({}, "0"),
    ("stager", "poll_interval"): ({}, "never"),
    ("stager", "max_poll_interval"): ({}, "-300"),
    ("stager", "namespace_mount"): (TAPE, "mnt/pnfs"),
    ("stager", "token_file"): (TAPE, "{w}/no-such-token"),
    ("stager", "cert"): (TAPE, "{w}/no-such-cert.pem"),
    ("stager", "key"): ({**TAPE, ("stager", "cert"): "{w}/cert.pem"}, "{w}/no-such-key.pem"),
    ("stager", "ca_path"): (TAPE, "{w}/no-such-ca"),
    ("transfer", "backend"): ({}, "ftp"),
    ("transfer", "allowed_schemes"): ({}, "file, gsiftp"),
    ("transfer", "file_roots"): ({}, "deliveries"),
    ("transfer", "allowed_hosts"): ({}, "10.0.0.0/33"),
    ("transfer", "denied_hosts"): ({}, "*bad*"),
    ("fts", "endpoint"): (FTS, ""),
    ("fts", "auth"): (FTS, "kerberos"),
    ("fts", "cert"): (FTS, "{w}/no-such-cert.pem"),
    ("fts", "key"): (FTS, "{w}/no-such-key.pem"),
    ("fts", "proxy"): (FTS, "{w}/no-such-proxy"),
    ("fts", "token_file"): (FTS, "{w}/no-such-token"),
    ("fts", "ca_path"): (FTS, "{w}/no-such-ca"),
    ("fts", "vo"): ({}, "meer kat"),
    ("fts", "source_template"): (FTS, "gsiftp://{host}{path}"),
    ("fts", "poll_interval"): ({}, "0"),
    ("fts", "max_poll_interval"): ({}, "5 minutes"),
    ("fts", "bulk_size"): ({}, "0"),
    ("fts", "transfer_timeout"): ({}, "-5"),
    ("fts", "give_up_after"): ({}, "forever"),
    ("fts", "verify_checksum"): ({}, "always"),
    ("fts", "overwrite"): ({}, "maybe"),
    ("fts", "retry"): ({}, "-1"),
    ("fts", "priority"): ({}, "9"),
    ("fts", "delegation_min_lifetime"): ({}, "0"),
    ("reconciler", "interval"): ({}, "0"),
    ("reconciler", "lease"): ({}, "soon"),
    ("reconciler", "requeue_after"): ({}, "-1"),
    ("startup", "wait_for_backends"): ({}, "-1"),
    ("events", "subscribers"): ({}, "ops ftp://hooks.example.org/x {w}/plain"),
    ("events", "notify_secret_file"): ({}, "{w}/plain"),  # there, but no whsec_ secret in it
    ("events", "notify_states"): ({}, "SUCCESS, DONE"),
    ("events", "timeout"): ({}, "0"),
    ("events", "retry_delay"): ({}, "-1"),
    ("events", "max_retry_delay"): ({}, "soon"),
    ("events", "max_attempts"): ({}, "0"),
    ("events", "sweep_interval"): ({}, "never"),
    ("events", "amqp"): ({}, "sometimes"),
    ("events", "exchange"): ({}, "transferd.events"),  # with the in-process queue: nowhere to publish
    ("retention", "keep"): ({}, "half a year"),
    ("retention", "archive"): ({}, "{w}/no-such-dir/archive.jsonl"),
    ("retention", "interval"): ({}, "0"),
    ("metrics", "endpoint"): ({}, "tcp:metrics"),
    ("metrics", "job_counts_max_age"): ({}, "-5"),
    ("log", "format"): ({}, "xml"),
    ("log", "level"): ({}, "verbose"),
    ("fleet", "heartbeat"): ({}, "0"),
    ("fleet", "stale_after"): ({("fleet", "heartbeat"): "10"}, "15"),  # a missed beat is no death
    ("scheduler", "interval"): ({}, "0"),
    ("scheduler", "queued_ahead"): ({}, "none"),
    ("scheduler", "groups"): ({}, "prod"),  # a group with no member
    ("scheduler", "weights"): ({}, "-2 prod"),
    ("scheduler", "default_weight"): ({}, "0"),
    ("limits", "max_staging"): ({}, "0"),
    ("limits", "max_transfers_per_host"): ({}, "lots"),
    ("limits", "host_limits"): ({}, "dav.example.org"),  # no limit
    ("limits", "max_transfers_per_submitter"): ({}, "-1"),
    ("limits", "max_waiting_per_submitter"): ({}, "1.5"),
    ("limits", "retry_after"): ({}, "soon"),
}

# The two the issue names, a password that must not be shown, and files that are there but unusable
# (refused while the daemon is built, not while the configuration is read).
EXTRA = [
    (("database", "url"), {}, "sqlite://"),
    (("queue", "url"), {}, "amqp://h/?bogus=1"),
    (("database", "url"), {}, "mysql://transferd:s3cret@db.example.org/transferd?pool_max=many"),
    (("api", "tls_cert"), {}, "{w}/cert.pem"),
    (("stager", "cert"), TAPE, "{w}/cert.pem"),
    (("events", "subscribers"), {}, "ops https://hooks.example.org/x {w}/plain"),  # its secret file is unusable
    (("events", "retry_delay"), {("events", "max_retry_delay"): "30"}, "60"),
]


class BadValueTests(unittest.TestCase):
    def setUp(self):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.workdir, "archive"))
        for name in ("plain", "cert.pem", "token"):
            with open(os.path.join(self.workdir, name), "w") as handle:
                handle.write("not what it should be\n")

    def settings(self, *layers):
        merged = {}
        for layer in (BASE, *layers):
            merged.update({key: value.replace("{w}", self.workdir) for key, value in layer.items()})
        return merged

    def write(self, name, settings):
        sections = {}
        for (section, key), value in settings.items():
            sections.setdefault(section, []).append(f"{key} = {value}")
        path = os.path.join(self.workdir, name + ".ini")
        with open(path, "w") as handle:
            handle.write("".join(f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items()))
        return path

    def run_twistd(self, path):
        try:
            result = subprocess.run([TWISTD, "--pidfile=", "-n", "transferd", "--config", path], cwd=self.workdir,
                                    capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired as expired:
            return None, f"still running after {expired.timeout}s"
        return result.returncode, result.stdout + result.stderr

    def test_every_key(self):
        """For every key, twistd exits non-zero printing one line naming section and key, and no traceback."""
        self.assertEqual(set(CASES), {(section, key) for section, keys in SCHEMA.items() for key in keys})
        runs = []
        for number, ((section, key), (context, bad)) in enumerate(CASES.items()):
            valid = self.settings(context)
            load_config(None, valid)  # the context alone is fine: the bad value is what is refused
            runs.append(((section, key), bad, self.write(f"case-{number}", self.settings(context, {(section, key): bad}))))
        for number, ((section, key), context, bad) in enumerate(EXTRA):
            runs.append(((section, key), bad,
                         self.write(f"extra-{number}", self.settings(context, {(section, key): bad}))))

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda run: self.run_twistd(run[2]), runs))

        problems = []
        for ((section, key), bad, path), (code, output) in zip(runs, results):
            lines = [line for line in output.splitlines() if line.strip()]
            name = f"[{section}] {key}"
            if code in (None, 0):
                problems.append(f"{name} = {bad!r}: exit status {code}: {output[-300:]!r}")
            elif "Traceback" in output or 'File "' in output:
                problems.append(f"{name} = {bad!r}: a traceback: {output[-600:]}")
            elif len(lines) != 1 or name not in lines[0]:
                problems.append(f"{name} = {bad!r}: not one line naming {name}: {output!r}")
            elif "s3cret" in output:
                problems.append(f"{name} = {bad!r}: the password is shown: {output!r}")
        self.assertEqual(problems, [], "\n".join(problems))
