"""The speech service as a Ray Serve deployment: FastAPI ingress, one engine per replica.

Without an address a small local Ray is started (no dashboard, as many CPUs as the replicas ask
for, at least 2) and shut down at the end; with one, the app joins that cluster and only the app
is removed at the end. Each replica holds a ``SpeechService`` (its own model copy and engine);
Ray Serve's proxy spreads requests over them and streams their bytes. With a CUDA device each
replica asks for one GPU, so ``--replicas`` places one engine per GPU.
"""

from __future__ import annotations

import contextlib
import errno
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any
from urllib.parse import urlparse

import torch

from ..core.devices import check_device
from ..core.errors import ConfigError, SourceError, naming_flag
from ..core.files import check_folder
from ..core.ports import bind_error
from ..models.sources import check_source, source_family
from ..runtime.engine import check_engine_options
from .service import ServeOptions, SpeechService, check_options, find_voices

APP_NAME = "tts-workbench"
ROUND_ROBIN = "ray.serve.experimental.round_robin_router.RoundRobinRouter"
ONGOING_REQUESTS = 1024  # requests one replica holds at once, streams and probes (``deployment``)


class SpeechDeployment:
    """One replica: its ``SpeechService`` and the FastAPI app over it (built by Ray Serve after
    ``__init__``, through ``__serve_build_asgi_app__``)."""

    def __init__(self, options: ServeOptions) -> None:
        from ray import serve

        self.service = SpeechService(options, replica=serve.get_replica_context().replica_id.unique_id)

    def check_health(self) -> None:
        """Ray Serve's periodic check: a replica whose engine stopped or hangs is replaced."""
        state = self.service.health()
        if state["status"] != "ok":
            raise RuntimeError(f"{state['status']}: {state['reason']}")

    def __serve_build_asgi_app__(self) -> Any:
        from .api import speech_app

        return speech_app(self.service)

    def __del__(self) -> None:
        if hasattr(self, "service"):
            self.service.close()


@dataclass
class Placement:
    """Where the server runs: the address and port it listens on, its replicas, the Ray cluster."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    address: str | None = None  # a Ray cluster to join; None: start a local Ray

    @property
    def url(self) -> str:
        """Where clients reach the server (an IPv6 host in brackets, as URLs write it)."""
        return self.listening_url(self.host, self.port)

    def listening_url(self, host: str, port: int) -> str:
        """Where clients reach an app whose Serve listens on ``host:port``: a wildcard host on a
        cluster (``--address``) is reached at the cluster's head, named by the address."""
        if self.address and self.address != "auto" and host in ("0.0.0.0", "::"):
            parsed = urlparse(self.address if "://" in self.address else f"ray://{self.address}")
            host = parsed.hostname or host
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def listening_note(self, host: str, port: int) -> str:
        """What to tell the user when the Serve joined listens elsewhere than --host/--port asked:
        Ray Serve keeps the HTTP options the cluster's Serve started with (only logging that it
        ignored the new ones), so the URL printed from the flags would be wrong."""
        if (host, port) == (self.host, self.port):
            return ""
        return (f"the cluster's Ray Serve already listens on {host}:{port} and keeps it: --host {self.host} "
                f"--port {self.port} are not used")  # fmt: skip


def check_port_free(host: str, port: int) -> None:
    """A ConfigError if ``host`` is no address of this machine's (``--host``: not an address, or
    one another machine has), or ``host:port`` cannot be listened on (``--port``: another server
    holds it). IPv4 and IPv6 alike."""
    error = bind_error(host, port)
    if error is None:
        return
    if isinstance(error, socket.gaierror):
        raise ConfigError(f"argument --host: {host!r} is not an address to listen on ({error.strerror}): "
                          "use 127.0.0.1, 0.0.0.0, :: or this machine's name")  # fmt: skip
    if error.errno in (errno.EADDRNOTAVAIL, errno.EINVAL):  # EINVAL: IPv6 link-local without a scope
        raise ConfigError(
            f"argument --host: {host} is not an address of this machine ({error.strerror}): use "
            "127.0.0.1, 0.0.0.0, :: or one of this machine's own addresses"
        )
    raise ConfigError(f"argument --port: cannot listen on {host}:{port} ({error.strerror}): "
                      "stop what holds it or pick another --port")  # fmt: skip


def check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """A ConfigError if the Ray address (``HOST:PORT`` or ``ray://HOST:PORT``) does not answer."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        port = parsed.port
    except ValueError:  # not a number, or past 65535
        port = None
    if parsed.hostname is None or port is None:
        raise ConfigError(f"argument --address: {address!r} is not HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(
            f"argument --address: no Ray cluster answers at {address} ({e}): start one with "
            "`ray start --head` or leave --address out for a local Ray"
        ) from None


def deployment(options: ServeOptions, replicas: int) -> Any:
    """The Ray Serve application: ``replicas`` engines behind one FastAPI ingress."""
    from ray import serve

    cpus = options.threads or 1
    gpus = 1 if options.device.startswith("cuda") else 0
    app = serve.deployment(
        name="speech",
        num_replicas=replicas,
        # Every request a replica holds counts against this, a speech stream's until its body
        # ends, and past it Ray Serve queues the rest in arrival order: /health and /metrics
        # waited behind every queued stream (minutes) when the server was busiest (before
        # 2026-12-07: max(16, 4 x max_streams)). The engine queues the streams it cannot run yet
        # (none is refused for load), so a replica takes far more requests than it has slots.
        max_ongoing_requests=ONGOING_REQUESTS,
        # Streams are long and alike and come in bursts: the default power-of-two choice reads
        # queue lengths that a burst outruns (4 streams went 3 and 1 to two replicas), so
        # requests take turns instead.
        request_router_config={"request_router_class": ROUND_ROBIN},
        ray_actor_options={
            "num_cpus": cpus,
            "num_gpus": gpus,
            "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(cpus)}},
        },
    )(serve.ingress()(SpeechDeployment))
    return app.bind(options)


def check_gpu_named(device: str) -> None:
    """A ConfigError for a CUDA device named by index: Ray gives a replica one GPU and sets
    CUDA_VISIBLE_DEVICES to it, so the replica sees no other (checked before the device itself,
    whose refusal would not say what serve wants instead)."""
    if device.startswith("cuda:"):
        raise ConfigError(
            f"argument --device {device}: serve gives each replica one GPU from Ray, which the replica "
            "sees as its only one: use --device cuda (and --replicas for one engine per GPU)"
        )


def check_gpus(device: str, replicas: int, local: bool) -> None:
    """A ConfigError when on a ``local`` Ray the replicas ask for more GPUs than this machine has
    (serve.run would wait for ever for a replica Ray cannot place; a cluster's GPUs are its
    workers', not this machine's)."""
    if local and device == "cuda" and replicas > (gpus := torch.cuda.device_count()):
        raise ConfigError(
            f"argument --replicas {replicas}: each replica needs a GPU of its own and this machine has "
            f"{gpus} GPU(s): lower --replicas, or join a cluster with more (--address)"
        )


def check_placement(options: ServeOptions, where: Placement) -> None:
    """Everything a serve can be refused for before Ray starts (so nothing is left running): the
    options that need no model, the voices folder, a GPU named by index, then with a cluster its
    address; locally the port, the device and the model source (a cluster's workers may have the
    GPUs and folders this machine lacks, and its proxy listens on its head); then the GPUs the
    replicas ask of Ray. Whether ``--max-input-chars`` fits ``--max-cache-len`` needs the model's
    tokenizer: each replica checks it as it starts."""
    check_options(options)
    find_voices(options.voices_dir)
    check_gpu_named(options.device)
    if where.address:
        check_reachable(where.address)
    else:
        check_port_free(where.host, where.port)
        with naming_flag("--device", SourceError):
            check_device(options.device)
        check_source(options.model, options.family)
        family = source_family(options.model, options.family)
        check_engine_options(family, options.step, alignment=options.alignment, fused=options.fused)
        check_folder(options.run_dir)  # an OSError names it (--out); made by the replica, once served
    check_gpus(options.device, where.replicas, local=not where.address)


def _start_ray(options: ServeOptions, where: Placement) -> None:
    """Join the cluster at ``where.address``, or start a local Ray sized to the replicas."""
    import ray

    if where.address:
        try:
            ray.init(address=where.address, log_to_driver=False)
        except ConnectionError as e:  # an OSError, which would read as a folder that cannot be made
            raise ConfigError(
                f"argument --address {where.address}: no Ray cluster to join ({e}): start one with "
                "`ray start --head` (then give its HOST:PORT), or leave --address out for a local Ray"
            ) from None
    else:
        cpus = max(2, where.replicas * (options.threads or 1))
        # "local": a Ray of its own even where RAY_ADDRESS is set or `ray start --head` ran here (without
        # it ray.init joins that cluster, then refuses num_cpus, an argument the user never gave).
        ray.init(
            address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
            object_store_memory=256 * 2**20,
        )  # fmt: skip


@contextlib.contextmanager
def served(options: ServeOptions, where: Placement) -> Iterator[tuple[str, str]]:
    """Inside: the app answers at the returned URL (call ``check_placement`` first), with a note
    when that is not where ``where`` asked (``Placement.listening_note``). Leaving it, or SIGTERM
    (raised here as KeyboardInterrupt, as Ctrl-C is), stops the app and the local Ray."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client  # Serve's HTTP options have no public reader

    previous = signal.getsignal(signal.SIGTERM)
    try:
        _start_ray(options, where)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (ray.init's handler exits), while Ray starts
        ray.shutdown()  # stop what it has started
        signal.signal(signal.SIGTERM, previous)
        raise KeyboardInterrupt from None
    signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs a handler of its own
    try:
        serve.start(http_options={"host": where.host, "port": where.port})
        try:
            serve.run(deployment(options, where.replicas), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # Ray Serve gave up on the replicas: say what each one raised
            raise ConfigError(f"the replicas could not start: {replica_error(deploy_failure(e))}") from None
        http = _get_global_client().http_config  # what Serve listens on: a cluster's may differ
        yield where.listening_url(http.host, http.port), where.listening_note(http.host, http.port)
    finally:
        # A second Ctrl-C or SIGTERM while stopping must not skip the rest of the stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if where.address:
                serve.delete(APP_NAME)  # the cluster and its Serve stay
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, sigint)


def deploy_failure(e: RuntimeError) -> str:
    """Why the deploy that raised ``e`` failed: the app's deployment messages, which hold the
    replica's traceback (from Ray 2.60 ``serve.run``'s error names only the deployment that
    failed), else ``e``'s own message (earlier Rays put the traceback there)."""
    from ray import serve

    try:
        deployments = serve.status().applications[APP_NAME].deployments.values()
        messages = [d.message for d in deployments if d.message]
    except Exception:  # status is asked of a controller that may be failing too: keep e's message
        messages = []
    return "\n".join(messages) or str(e)


def replica_error(message: str) -> str:
    """The exception a replica raised, from Ray Serve's deploy-failure message (which holds the
    replica's traceback): its last ``SomeError: text`` line, module path dropped; the message's
    last line when there is none."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    raised = [m for line in lines if (m := re.match(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)\b.*)$", line))]
    return raised[-1].group(1) if raised else (lines[-1] if lines else message)


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve_until_stopped(options: ServeOptions, where: Placement, say: Any = print) -> dict[str, Any]:
    """Serve until Ctrl-C or SIGTERM, telling ``say(message)`` when it starts and once the app
    answers. What was served: ``served_s`` from the moment the app answered, None (and
    ``stopped``: "before serving") when the stop came while Ray or the replicas were starting."""
    check_placement(options, where)
    url = where.url  # until the app answers: then where Serve really listens
    ray_at = f"the Ray cluster at {where.address}" if where.address else "a local Ray"
    say(f"starting {where.replicas} replica(s) on {ray_at}: each builds {options.model}, prepares its "
        "voices and warms up its engine (half a minute or more)")  # fmt: skip
    answered: float | None = None  # perf_counter when the app answered
    with contextlib.suppress(KeyboardInterrupt), served(options, where) as listening:
        answered = time.perf_counter()
        url, note = listening
        if note:
            say(note)
        say(f"serving {options.model} at {url} ({where.replicas} replica(s) on {ray_at}); Ctrl-C stops")
        while True:
            time.sleep(1.0)
    served_s = None if answered is None else time.perf_counter() - answered
    return {"url": url, "model": options.model, "replicas": where.replicas, "address": where.address,
            "served_s": served_s, "stopped": "before serving" if answered is None else "cleanly"}  # fmt: skip
