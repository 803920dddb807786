"""The embedded Apache Kafka broker, and the choice between it and Tansu.

``KafkaBroker`` runs one Kafka node in KRaft mode (broker and controller in one
JVM) from Kafka's own jars, fetched once by Maven from ``deploy/kafka/pom.xml``
(``make kafka-jars``; the version is docker-compose.yml's). It follows the rules
the Tansu broker follows (``pipeline/embedded/tansu.py``):

- its data lives under the state dir (``<state>/kafka/data``), formatted once, so
  topics, offsets and transactions survive a restart;
- both listeners (clients and controller) are on loopback, on ports free at start;
- the JVM heap is bounded (``-Xmx512m``);
- it never outlives meterstream: it runs in its own session with
  ``PR_SET_PDEATHSIG`` (SIGTERM, Kafka's clean shutdown, if meterstream dies, even
  by SIGKILL), and ``stop()`` sends SIGTERM, then SIGKILL after a bound;
- it is ready when it answers a metadata request listing itself (an open port is
  not enough: the controller may still be electing) and its group and transaction
  coordinators answer (their internal topics are created on first use).

``choose_broker`` implements ``METERSTREAM_EMBEDDED_BROKER``: ``auto`` is Apache
Kafka where Java 17+ and the jars are found, Tansu otherwise; ``kafka`` is an
error where they are not.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from meterstream.embedded.processes import (
    die_with_parent,
    free_port,
    log_tail,
    stop_process,
    wait_for_port,
)
from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.errors import BrokerError, ConfigError
from meterstream.settings import Settings

log = logging.getLogger("meterstream.broker")

MIN_JAVA = 17
# Where `make kafka-jars` puts the jars: next to the pom, in the checkout meterstream
# runs from (an editable install, as `make install` makes). METERSTREAM_KAFKA_JARS_DIR
# points elsewhere (any folder holding kafka_2.13-*.jar and its dependencies, such as
# the libs/ folder of a Kafka distribution).
DEFAULT_JARS_DIR = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "jars"
HEAP_MB = 512
# Kafka's own choice of collector and pause target (kafka-run-class.sh) in a heap of
# 128-512 MB (RSS ~190 MB idle; see bench/broker_startup.py); exit rather than limp on
# after an OutOfMemoryError; no hsperfdata file in /tmp; headless.
JVM_OPTIONS = (
    "-Xms128m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:+ExitOnOutOfMemoryError",
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
)
STOP_TIMEOUT = 30.0
# WARN and above, plus the line that says the server started.
LOG4J_PROPERTIES = """\
log4j.rootLogger=WARN, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.server.KafkaRaftServer=INFO
"""

BrokerName = Literal["kafka", "tansu"]


# ------------------------------------------------------------------ Java and the jars


def java_command(settings: Settings) -> str | None:
    """The java executable: METERSTREAM_KAFKA_JAVA, else $JAVA_HOME/bin/java, else
    ``java`` on PATH; None when there is none."""
    if settings.kafka_java:
        return shutil.which(settings.kafka_java)
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home) / "bin" / "java", os.X_OK):
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


_VERSION = re.compile(r'version "(\d+)(?:\.(\d+))?')


def parse_java_major(version_output: str) -> int | None:
    """The major version in ``java -version``'s output (``1.8.0`` is 8, ``17.0.15`` 17)."""
    match = _VERSION.search(version_output)
    if match is None:
        return None
    major = int(match.group(1))
    if major == 1 and match.group(2) is not None:
        return int(match.group(2))
    return major


def java_major(java: str) -> int | None:
    try:
        done = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_java_major(done.stderr + done.stdout)


def jars_dir(settings: Settings) -> Path:
    return settings.kafka_jars_dir or DEFAULT_JARS_DIR


def kafka_version(jars: Path) -> str | None:
    """Kafka's version from its jar (``kafka_2.13-3.9.1.jar``), None without it."""
    found = sorted(jars.glob("kafka_2.13-*.jar"))
    if not found:
        return None
    return found[-1].name.removeprefix("kafka_2.13-").removesuffix(".jar")


def kafka_unavailable(settings: Settings) -> str | None:
    """Why the embedded Apache Kafka cannot run here, or None when it can."""
    java = java_command(settings)
    if java is None:
        where = settings.kafka_java or "java on PATH or in JAVA_HOME"
        return f"no Java found ({where}; METERSTREAM_KAFKA_JAVA sets it)"
    major = java_major(java)
    if major is None or major < MIN_JAVA:
        found = "an unknown version" if major is None else f"Java {major}"
        return f"{java} is {found}; Kafka needs Java {MIN_JAVA} or later"
    jars = jars_dir(settings)
    if kafka_version(jars) is None:
        return f"no Kafka jars in {jars} (`make kafka-jars` fetches them with Maven)"
    return None


@dataclass(frozen=True)
class BrokerChoice:
    name: BrokerName
    reason: str


def choose_broker(settings: Settings) -> BrokerChoice:
    """Which embedded broker to start (METERSTREAM_EMBEDDED_BROKER)."""
    if settings.embedded_broker == "tansu":
        return BrokerChoice("tansu", "METERSTREAM_EMBEDDED_BROKER=tansu")
    problem = kafka_unavailable(settings)
    if settings.embedded_broker == "kafka":
        if problem is not None:
            raise ConfigError(
                [f"METERSTREAM_EMBEDDED_BROKER=kafka (or --broker kafka): {problem}"],
                source="the embedded broker",
            )
        return BrokerChoice("kafka", "METERSTREAM_EMBEDDED_BROKER=kafka")
    if problem is not None:
        return BrokerChoice("tansu", problem)
    return BrokerChoice("kafka", f"Java {MIN_JAVA}+ and Kafka's jars found")


def embedded_broker(
    settings: Settings,
    *,
    state_dir: Path | None = None,
    port: int | None = None,
    log_path: Path | None = None,
) -> KafkaBroker | EmbeddedBroker:
    """The chosen embedded broker, not started yet; logs which one and why."""
    choice = choose_broker(settings)
    broker = new_broker(choice, settings, state_dir=state_dir, port=port, log_path=log_path)
    log.info("embedded broker: %s (%s)", describe_broker(broker), choice.reason)
    return broker


def new_broker(
    choice: BrokerChoice,
    settings: Settings,
    *,
    state_dir: Path | None = None,
    port: int | None = None,
    log_path: Path | None = None,
) -> KafkaBroker | EmbeddedBroker:
    """The broker ``choice`` names, not started yet. Kafka keeps its data in
    ``<state_dir>/kafka`` (default: the settings' state dir)."""
    if choice.name == "kafka":
        return KafkaBroker(
            state_dir or settings.state_dir,
            port=port,
            log=log_path,
            java=java_command(settings),
            jars=jars_dir(settings),
        )
    return EmbeddedBroker(port=port, log=log_path)


def describe_broker(broker: KafkaBroker | EmbeddedBroker) -> str:
    if isinstance(broker, KafkaBroker):
        return f"Apache Kafka {broker.version} (KRaft, data in {broker.data_dir})"
    return "Tansu (memory only, no transactions)"


def broker_name(broker: KafkaBroker | EmbeddedBroker) -> BrokerName:
    return "kafka" if isinstance(broker, KafkaBroker) else "tansu"


# ------------------------------------------------------------------------ the broker


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding, never starting with
    ``-`` (as Kafka's own ``Uuid.randomUuid``: ``kafka-storage format -t -Xy...`` reads
    such an id as an option and fails, for 1 in 64 random ids)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def read_cluster_id(data_dir: Path) -> str | None:
    with contextlib.suppress(OSError):
        for line in (data_dir / "meta.properties").read_text().splitlines():
            if line.startswith("cluster.id="):
                return line.split("=", 1)[1].strip()
    return None


def server_properties(*, host: str, port: int, controller_port: int, data_dir: Path) -> str:
    """The node's configuration: one KRaft node on loopback, sized for one machine."""
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@{host}:{controller_port}",
        "listeners": f"PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(data_dir),
        # As docker-compose.yml: meterstream and Faust create their topics with the
        # right partitions, retention and cleanup policy; a typo must not create one.
        "auto.create.topics.enable": "false",
        "num.partitions": "4",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        # One broker: the internal topics must fit on it, or consumer groups and
        # transactions (exactly_once) never start. Fewer partitions than Kafka's 50:
        # created on first use, they are ready sooner on a small machine.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "8",
        # A single member joins at once (compose waits 3 s for the others).
        "group.initial.rebalance.delay.ms": "0",
        # METERSTREAM_SESSION_TIMEOUT_SECONDS may be as low as 2 s (Kafka's minimum is 6 s:
        # below it the worker's join failed with InvalidSessionTimeoutError and it never
        # consumed; the Stripe fault test uses 4 s for a quick hand-over after a SIGKILL).
        "group.min.session.timeout.ms": "2000",
        # Default retention >= the 7-day dedup horizon (usage-events sets 14 days itself).
        "log.retention.hours": "336",
        "message.max.bytes": "2097152",
        # Only closed segments are compacted or expire: 64 MB segments (Kafka's are 1 GB)
        # let the changelogs of a one-machine stack compact, so a restart's table
        # recovery reads the latest value per key rather than every write.
        "log.segment.bytes": str(64 * 1024 * 1024),
        # The log cleaner's buffer is on the heap: 16 MB, not 128 MB, in a 512 MB heap.
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


class KafkaBroker:
    """One Apache Kafka node (KRaft, broker and controller) on loopback, as a child
    process, with its data under ``<state_dir>/kafka``.

    The same interface as :class:`meterstream.embedded.tansu.EmbeddedBroker`: ``start()``,
    ``stop()``, ``bootstrap``, ``proc``, a context manager. ``log`` is where the
    JVM's output goes (default ``<state_dir>/kafka/broker.log``).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        log: Path | None = None,
        java: str | None = None,
        jars: Path | None = None,
        heap_mb: int = HEAP_MB,
    ) -> None:
        self.dir = Path(state_dir).resolve() / "kafka"
        self.host = host
        self.requested_port = port
        self.port = port or 0
        self.controller_port = 0
        self.log = log or self.dir / "broker.log"
        self.java = java or shutil.which("java") or "java"
        self.jars = jars or DEFAULT_JARS_DIR
        self.heap_mb = heap_mb
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in: float | None = None  # seconds from start() to ready
        self.formatted = False  # True when this start formatted a new data dir

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def version(self) -> str:
        return kafka_version(self.jars) or "?"

    @property
    def cluster_id(self) -> str | None:
        return read_cluster_id(self.data_dir)

    def start(self, timeout: float = 90.0) -> KafkaBroker:
        t0 = time.monotonic()
        if kafka_version(self.jars) is None:
            raise BrokerError(f"no Kafka jars in {self.jars} (`make kafka-jars`)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        (self.dir / "log4j.properties").write_text(LOG4J_PROPERTIES)
        # A port taken between free_port() and the JVM's bind: try new ports.
        for attempt in range(3):
            self.port = self.requested_port or free_port(self.host)
            self.controller_port = free_port(self.host)
            while self.controller_port == self.port:
                self.controller_port = free_port(self.host)
            config = self._write_config("server.properties", self.data_dir)
            if not (self.data_dir / "meta.properties").exists():
                self._format()
            offset = self._log_size()
            try:
                self._launch(config, deadline=t0 + timeout)
            except BrokerError:
                if attempt < 2 and "Address already in use" in self._log_since(offset):
                    continue
                raise
            self.started_in = time.monotonic() - t0
            return self
        raise AssertionError("unreachable")

    def _write_config(self, name: str, data_dir: Path) -> Path:
        """The broker's properties (this host and ports, logs in ``data_dir``) as ``name``."""
        path = self.dir / name
        path.write_text(
            server_properties(
                host=self.host,
                port=self.port,
                controller_port=self.controller_port,
                data_dir=data_dir,
            )
        )
        return path

    def _format(self) -> None:
        """Format a new data dir (once: its meta.properties keeps the cluster id).
        Formatted beside it and renamed, so an interrupted format leaves no half."""
        if self.data_dir.exists():
            raise BrokerError(
                f"{self.data_dir} exists without meta.properties: not a Kafka log this "
                "broker can use; move it away (or remove it) to start with an empty one"
            )
        staging = self.dir / "data.formatting"
        shutil.rmtree(staging, ignore_errors=True)
        staging_config = self._write_config("format.properties", staging)
        cmd = [
            self.java,
            "-Xmx256m",
            *self._log4j(),
            "-cp",
            str(self.jars / "*"),
            "kafka.tools.StorageTool",
            "format",
            "-t",
            new_cluster_id(),
            "-c",
            str(staging_config),
        ]
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(signal.SIGKILL),
            )
        except subprocess.TimeoutExpired:
            raise BrokerError("formatting Kafka's data dir took over 120 s") from None
        finally:
            staging_config.unlink(missing_ok=True)
        if done.returncode != 0:
            raise BrokerError(
                f"formatting Kafka's data dir failed ({done.returncode}):\n"
                + (done.stderr or done.stdout)[-2000:]
            )
        staging.rename(self.data_dir)
        self.formatted = True

    def _log4j(self) -> list[str]:
        return [f"-Dlog4j.configuration=file:{self.dir / 'log4j.properties'}"]

    def _launch(self, config: Path, deadline: float) -> None:
        cmd = [
            self.java,
            f"-Xmx{self.heap_mb}m",
            *JVM_OPTIONS,
            *self._log4j(),
            f"-Dkafka.logs.dir={self.dir}",
            "-cp",
            str(self.jars / "*"),
            "kafka.Kafka",
            str(config),
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                start_new_session=True,  # a terminal's Ctrl-C reaches only our process
                preexec_fn=die_with_parent(signal.SIGTERM),  # Kafka's clean shutdown
            )
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        try:
            wait_for_port(self.host, self.port, max(deadline - time.monotonic(), 0.1), self.proc)
        except BrokerError as exc:
            raise BrokerError(f"Apache Kafka: {exc}\n{self.log_tail()}") from None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(
                    f"Apache Kafka exited with code {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            if is_ready(self.bootstrap):
                return
            time.sleep(0.1)
        raise BrokerError(
            f"Apache Kafka on {self.bootstrap} was not ready in time:\n" + self.log_tail()
        )

    def _log_size(self) -> int:
        try:
            return self.log.stat().st_size
        except OSError:
            return 0

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log, lines)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (Kafka's clean shutdown), then SIGKILL after ``timeout``."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_ready(bootstrap: str, timeout: float = 5.0) -> bool:
    """True when the broker answers a metadata request that lists a broker, and has a
    group coordinator and a transaction coordinator (asking creates their internal
    topics, so the worker's first group join and transaction probe find them ready
    instead of failing and retrying)."""

    async def probe() -> bool:
        from aiokafka import AIOKafkaClient
        from aiokafka.client import CoordinationType

        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            async with asyncio.timeout(timeout):
                await client.bootstrap()
                if not client.cluster.brokers():
                    return False
                await client.coordinator_lookup(CoordinationType.GROUP, READY_KEY)
                await client.coordinator_lookup(CoordinationType.TRANSACTION, READY_KEY)
            return True
        except Exception:  # not ready yet: asked again
            return False
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    aiokafka_log = logging.getLogger("aiokafka")
    previous = aiokafka_log.level
    aiokafka_log.setLevel(logging.CRITICAL)  # "Unable connect" while it starts is expected
    try:
        # Its own thread and loop: start() may be called while a loop runs.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, probe()).result()
    finally:
        aiokafka_log.setLevel(previous)


READY_KEY = "meterstream-ready"
