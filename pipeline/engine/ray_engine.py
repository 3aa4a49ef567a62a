"""Scale-out on Ray: a pool of actors, each holding a warm :class:`~pipeline.run.process.Processor`.

What runs where:

- The **coordinator** (the daemon, or the `run` process) keeps everything that needs the local
  disk or must happen once: intake, the ledger, stem choice, the manifest, and writing outputs.
  It reads each input's bytes and sends them, with the name, SHA-256, stem, options and the rules
  in force, to a free actor.
- An **actor** (one per GPU with ``num_gpus=1``, or CPU actors) writes the bytes to a temp file,
  runs the ordinary ``Processor.process`` into a temp outbox, and returns every file it wrote as
  ``{relative_path: bytes}`` plus the record. Paths in records that point at the actor's temp
  folders are rewritten to the coordinator's real input path and outbox. No shared filesystem is
  needed; only the models (and any LoRA files the rules name) must be present on every worker.
- The coordinator writes the files atomically (:func:`~pipeline.io.imageio.atomic_write_bytes`),
  the JSON records last, so a reader never sees a record before the image it names.

Each actor runs **one image at a time**, and a dead actor gets work again only after it has been
restarted and answered. That is what makes an actor death attributable: the image it held when its
process died (segfault, OOM kill, lost node) is known exactly, so only that image's attempt is
counted (Ray restarts the actor, ``max_restarts``; ``max_task_retries=0`` so
Ray never re-runs a task behind our back), and an image that kills workers repeatedly ends as
``failed`` instead of taking the pool down forever. Backpressure comes from the bounded number of
images in flight (``max_in_flight``, read and waiting for an actor or running on one).

``import ray`` happens only in here, and only when a pool starts, so the CLI's ``--help`` and the
local engine never pay for it.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.io.imageio import ImageLoadError, atomic_write_bytes, read_file_bytes
from pipeline.io.outputs import stem_for, write_failure
from pipeline.run.deaths import DEFAULT_MAX_DEATHS, death_message  # noqa: F401  (one policy, re-exported)
from pipeline.run.process import Processor, record_base
from pipeline.run.rules import RuleSet, default_rules, load_rules

RAY_INSTALL_HINT = "pip install 'product-studio[ray]'"
# Inside a ray worker, its temp folders are named so; only paths under them are rewritten.
_TASK_PREFIX = "product-studio-task-"


class EngineError(RuntimeError):
    """The Ray pool cannot run: Ray is not installed, the cluster cannot be reached, the sizing is
    impossible, or no actor came up. The CLI turns it into a clear message and a non-zero exit."""


class WorkerDiedError(RuntimeError):
    """The actor process died while it held this image (crash, OOM kill, node lost).

    ``worker_died`` lets callers recognise it without importing this module (the daemon's worker
    duck-types it, as it does ``permanent``)."""

    worker_died = True

    def __init__(self, name: str, detail: str):
        super().__init__(f"worker process died while processing {name}: {detail}")
        self.name = name
        self.detail = detail


class PoolDraining(RuntimeError):
    """The coordinator is stopping: an image still waiting for a free actor is not started. It was
    never sent anywhere, so it goes back to the queue without counting an attempt (``requeue``)."""

    requeue = True


def import_ray() -> Any:
    """``import ray``, or :class:`EngineError` telling how to install it."""
    try:
        import ray
    except ImportError as e:
        raise EngineError(f"--engine ray needs Ray, which is not installed ({e}). Install it with: "
                          f"{RAY_INSTALL_HINT}") from None
    return ray


# ------------------------------------------------------------------------------------------------
# Options and sizing


@dataclass(frozen=True)
class PoolOptions:
    """How the pool is placed and sized (from `--address`, `--actors`, ... flags). None = default.

    ``processor_factory``: what each actor builds its processor with, ``factory(settings, rules)``;
    a ``"module:function"`` string (imported on the worker) or a picklable callable. Default:
    :class:`pipeline.run.process.Processor`."""

    address: str | None = None
    actors: int | None = None
    max_in_flight: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    max_restarts: int = -1
    max_deaths: int = DEFAULT_MAX_DEATHS
    start_timeout: float = 600.0
    processor_factory: str | Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.actors is not None and self.actors < 1:
            problems.append(f"--actors must be at least 1, not {self.actors}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            problems.append(f"--max-in-flight must be at least 1, not {self.max_in_flight}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            problems.append(f"--cpus-per-actor must be more than 0, not {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            problems.append(f"--gpus-per-actor must be 0 or more, not {self.gpus_per_actor}")
        if self.max_deaths < 1:
            problems.append(f"max_deaths must be at least 1, not {self.max_deaths}")
        if problems:
            raise EngineError("; ".join(problems))


@dataclass(frozen=True)
class Sizing:
    """The pool's shape once the cluster's resources are known."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    max_in_flight: int
    notes: tuple[str, ...] = ()


def plan_sizing(opts: PoolOptions, resources: dict[str, float]) -> Sizing:
    """Defaults: one actor per GPU (``num_gpus=1``, 1 CPU each) when the cluster has GPUs; otherwise
    CPU actors of up to 4 CPUs each (torch's intra-op threads), as many as the CPUs allow. In flight:
    two images per actor, so the next one is read and waiting when an actor frees up.

    Raises :class:`EngineError` when the request cannot fit even one actor; only notes when the
    actors asked for exceed the cluster now (an autoscaler may add nodes; the extra actors wait)."""
    gpus = float(resources.get("GPU", 0.0))
    cpus = float(resources.get("CPU", 0.0))
    gpa = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    cpa = opts.cpus_per_actor if opts.cpus_per_actor is not None else (1.0 if gpa > 0 else max(1.0, min(4.0, cpus)))
    if gpa > 0 and gpus < gpa:
        raise EngineError(f"each actor asks for {gpa:g} GPU(s) but the cluster has {gpus:g}; "
                          "use --gpus-per-actor 0 for CPU actors")
    if cpa > cpus:
        raise EngineError(f"each actor asks for {cpa:g} CPU(s) but the cluster has {cpus:g}; lower --cpus-per-actor")
    if opts.actors is not None:
        n = opts.actors
    elif gpa > 0:
        n = max(1, int(gpus // gpa))
    else:
        n = max(1, int(cpus // cpa))
    notes = []
    if n * cpa > cpus or (gpa > 0 and n * gpa > gpus):
        notes.append(f"{n} actors x ({cpa:g} CPU, {gpa:g} GPU) exceed the cluster's {cpus:g} CPU / {gpus:g} GPU "
                     "right now; actors that do not fit start only when resources appear")
    inflight = opts.max_in_flight if opts.max_in_flight is not None else 2 * n
    return Sizing(n, cpa, gpa, inflight, tuple(notes))


# ------------------------------------------------------------------------------------------------
# What travels


@dataclass
class ImageTask:
    """One input, as sent to an actor: its bytes and everything needed to name and route its outputs."""

    name: str                 # inbox-relative or file name; the temp copy gets its basename
    data: bytes
    source: str               # the coordinator's path of the input (records point here)
    outbox: str               # the coordinator's outbox (records point here)
    stem: str
    sha256: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # dry_run, classes, actions (catalog runs)


@dataclass
class ImageResult:
    """What comes back: the record and every file written, relative to the outbox."""

    record: dict[str, Any]
    files: dict[str, bytes]
    worker: dict[str, Any] = field(default_factory=dict)


def _rewrite(obj: Any, mapping: list[tuple[str, str]]) -> Any:
    if isinstance(obj, str):
        for old, new in mapping:
            if old in obj:
                obj = obj.replace(old, new)
        return obj
    if isinstance(obj, dict):
        return {k: _rewrite(v, mapping) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rewrite(v, mapping) for v in obj]
    return obj


def run_task(processor: Any, task: ImageTask) -> ImageResult:
    """The actor's job, free of Ray: process ``task`` with ``processor`` in a temp folder and return
    the record and the files written, with temp paths rewritten to the coordinator's.

    JSON records are re-serialised the way every pipeline writer writes them (indent 2, trailing
    newline) only when they held a temp path; other files travel byte for byte."""
    with tempfile.TemporaryDirectory(prefix=_TASK_PREFIX) as tmp:
        in_dir, out_dir = Path(tmp, "in"), Path(tmp, "out")
        in_dir.mkdir()
        out_dir.mkdir()
        src = in_dir / (Path(task.name).name or "input")
        src.write_bytes(task.data)
        record = processor.process(src, out_dir, sha256=task.sha256, stem=task.stem, **task.options)
        # Longest first: the input file before the folders that contain it.
        mapping = [(str(src), task.source), (str(out_dir), task.outbox), (str(in_dir), str(Path(task.source).parent))]
        files: dict[str, bytes] = {}
        for p in sorted(out_dir.rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue  # hidden temp files of an interrupted atomic write are not outputs
            data = p.read_bytes()
            if p.suffix == ".json" and any(old.encode() in data for old, _ in mapping):
                data = (json.dumps(_rewrite(json.loads(data), mapping), indent=2, default=str) + "\n").encode()
            files[p.relative_to(out_dir).as_posix()] = data
    return ImageResult(_rewrite(record, mapping) if isinstance(record, dict) else record, files)


def write_result(result: ImageResult, outbox: Path) -> None:
    """Write an actor's files under ``outbox`` atomically, images first and JSON records last."""
    root = Path(outbox)
    names = sorted(result.files, key=lambda n: (n.endswith(".json"), n))
    for rel in names:
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise ValueError(f"refusing an output path from a worker that leaves the outbox: {rel!r}")
        atomic_write_bytes(root / rel, result.files[rel])


# ------------------------------------------------------------------------------------------------
# The actor


def _factory(spec: str | Callable[..., Any] | None) -> Callable[..., Any]:
    if spec is None:
        return Processor
    if callable(spec):
        return spec
    mod, _, attr = spec.partition(":")
    return getattr(importlib.import_module(mod), attr or "make_processor")


def warm(processor: Any) -> None:
    """The processor's own warm-up (:meth:`pipeline.run.process.Processor.warm_up`: models loaded, one
    detection run), so a missing model fails the pool's start, not image 1. Processors without one
    (test doubles) are not warmed."""
    fn = getattr(processor, "warm_up", None)
    if callable(fn):
        fn()


class ProcessorActor:
    """Body of the Ray actor (wrapped with ``ray.remote`` when a pool starts): one warm processor.

    Rules arrive with every task (a small object, shared through Ray's object store by hash); the
    processor switches to them between images when their hash changes, so a rule-file edit on the
    coordinator reaches every actor without restarting it."""

    def __init__(self, settings: Any, factory: str | Callable[..., Any] | None, threads: int | None):
        if threads:
            try:
                import torch

                torch.set_num_threads(max(1, int(threads)))
            except ImportError:
                pass
        self.settings = settings
        self.factory = factory
        self.processor: Any = None

    def _processor(self, rules: Any) -> Any:
        if self.processor is None:
            self.processor = _factory(self.factory)(self.settings, rules)
        elif getattr(self.processor, "rules_hash", None) != getattr(rules, "sha256", None):
            self.processor.rules = rules
        return self.processor

    def warm_up(self, rules: Any) -> dict[str, Any]:
        warm(self._processor(rules))
        return self.info()

    def info(self) -> dict[str, Any]:
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname()}

    def process(self, task: ImageTask, rules: Any) -> ImageResult:
        result = run_task(self._processor(rules), task)
        result.worker = self.info()
        return result


# ------------------------------------------------------------------------------------------------
# The pool (coordinator side)


class RayPool:
    """Actors plus the free-actor queue. :meth:`run` is blocking and thread-safe: the caller's
    thread waits for a free actor (backpressure), sends the task, and gets the result or the
    exception, so several coordinator threads keep several actors busy."""

    def __init__(self, settings: Any, options: PoolOptions | None = None):
        self.settings = settings
        self.opts = options or PoolOptions()
        self.sizing: Sizing | None = None
        self.actors: list[Any] = []
        self.workers: list[dict[str, Any]] = []
        self._free: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._draining = threading.Event()
        self._owns_ray = False
        self._rules_lock = threading.Lock()
        self._rules_ref: tuple[str, Any] | None = None
        self._lost = 0  # actors that died and could not be brought back
        self._ray: Any = None

    def start(self, rules: Any) -> Sizing:
        """Connect (``address``) or start a local Ray instance with this machine's CPUs, start the
        actors and warm them up. Raises :class:`EngineError`, or what a warm-up raised on an actor
        (e.g. :class:`~pipeline.models.registry.ModelLoadError`)."""
        ray = self._ray = import_ray()
        if not ray.is_initialized():
            import signal

            # ray.init installs its own SIGTERM handler in the driver; the daemon's (finish the
            # images in flight, then exit 0) must stay in force. The pool's close() shuts Ray down.
            main = threading.current_thread() is threading.main_thread()
            handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
            try:
                if self.opts.address:
                    ray.init(address=self.opts.address, log_to_driver=False, logging_level="WARNING")
                else:
                    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False,
                             logging_level="WARNING")
            except Exception as e:  # ConnectionError, RuntimeError, ValueError: all "cannot start"
                where = f"the Ray cluster at {self.opts.address}" if self.opts.address else "a local Ray instance"
                raise EngineError(f"cannot start or reach {where}: {e}") from None
            finally:
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
            self._owns_ray = True
        try:
            return self._start_actors(ray, rules)
        except BaseException:
            self.close()
            raise

    def _start_actors(self, ray: Any, rules: Any) -> Sizing:
        sizing = self.sizing = plan_sizing(self.opts, ray.cluster_resources())
        remote = ray.remote(ProcessorActor).options(
            num_cpus=sizing.cpus_per_actor, num_gpus=sizing.gpus_per_actor, max_restarts=self.opts.max_restarts,
            max_task_retries=0, max_concurrency=1)
        threads = int(sizing.cpus_per_actor) if sizing.cpus_per_actor >= 1 else 1
        self.actors = [remote.remote(self.settings, self.opts.processor_factory, threads) for _ in range(sizing.actors)]
        rules_ref = self._rules(rules)
        pending = {a.warm_up.remote(rules_ref): a for a in self.actors}
        ready, waiting = ray.wait(list(pending), num_returns=len(pending), timeout=self.opts.start_timeout)
        if not ready:
            raise EngineError(f"no Ray actor started within {self.opts.start_timeout:.0f}s (asked for "
                              f"{sizing.actors} x {sizing.cpus_per_actor:g} CPU, {sizing.gpus_per_actor:g} GPU; "
                              f"cluster: {ray.cluster_resources()})")
        for ref in ready:
            try:
                self.workers.append(self._get(ref, "warm-up"))
            except WorkerDiedError as e:
                raise EngineError(f"a Ray actor died while loading its models: {e.detail}") from None
            self._free.put(pending[ref])
        notes = list(sizing.notes)
        for ref in waiting:
            ray.kill(pending[ref], no_restart=True)
            self.actors.remove(pending[ref])
        if waiting:
            notes.append(f"{len(waiting)} of {sizing.actors} actors did not start within "
                         f"{self.opts.start_timeout:.0f}s; running with {len(ready)}")
        self.sizing = Sizing(len(self.actors), sizing.cpus_per_actor, sizing.gpus_per_actor, sizing.max_in_flight,
                             tuple(notes))
        return self.sizing

    def _rules(self, rules: Any) -> Any:
        """The rules as an object-store reference, put once per hash (every task refers to it)."""
        key = str(getattr(rules, "sha256", None) or id(rules))
        with self._rules_lock:
            if self._rules_ref is None or self._rules_ref[0] != key:
                self._rules_ref = (key, self._ray.put(rules))
            return self._rules_ref[1]

    def _get(self, ref: Any, name: str) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as e:
            raise WorkerDiedError(name, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                # The worker's own exception, so callers classify it as they would locally
                # (ModelLoadError is fatal, ImageLoadError permanent, ...).
                cause.add_note(f"raised on a Ray worker:\n{e}")
                raise cause from None
            raise

    def _acquire(self) -> Any:
        while True:
            if self._closed.is_set():
                raise EngineError("the Ray pool is closed")
            if self._draining.is_set():
                raise PoolDraining("stopping: not started")
            with self._rules_lock:
                if self.actors and self._lost >= len(self.actors):
                    raise EngineError("every Ray actor died and none could be restarted (see the Ray logs)")
            try:
                actor = self._free.get(timeout=0.5)
            except queue.Empty:
                continue
            if self._draining.is_set():  # a stop came while this caller waited
                self._free.put(actor)
                raise PoolDraining("stopping: not started")
            return actor

    def run(self, task: ImageTask, rules: Any) -> ImageResult:
        """Process ``task`` on the next free actor (waits for one). Raises :class:`WorkerDiedError`
        when the actor died with it (Ray restarts the actor), or the processor's own exception."""
        actor = self._acquire()
        try:
            result = self._get(actor.process.remote(task, self._rules(rules)), task.name)
        except WorkerDiedError:
            self._revive(actor, rules)
            raise
        except BaseException:
            self._free.put(actor)  # the processor raised: the actor itself is fine
            raise
        self._free.put(actor)
        return result

    def _revive(self, actor: Any, rules: Any) -> None:
        """Give a dead actor back to the pool only once Ray has restarted it and it answers a
        warm-up: a task sent to it while it is still dying would fail too, and that failure would
        be counted against an image that never ran. Runs in the background; an actor that does not
        come back within ``start_timeout`` is given up."""
        ray, rules_ref = self._ray, self._rules(rules)

        def loop() -> None:
            deadline = time.monotonic() + self.opts.start_timeout
            while not self._closed.is_set() and time.monotonic() < deadline:
                try:
                    ray.get(actor.warm_up.remote(rules_ref))
                except ray.exceptions.RayActorError:
                    time.sleep(0.5)
                    continue
                except Exception:
                    break  # it is up but cannot warm up (e.g. a model vanished): unusable
                self._free.put(actor)
                return
            with self._rules_lock:
                self._lost += 1

        threading.Thread(target=loop, name="product-studio-ray-revive", daemon=True).start()

    def drain(self) -> None:
        """Start no more images: callers waiting for an actor get :class:`PoolDraining`; the images
        already on actors run to the end."""
        self._draining.set()

    def close(self) -> None:
        """Kill the actors; shut Ray down only if this pool started it (never someone else's)."""
        if self._closed.is_set():
            return
        self._closed.set()
        ray = self._ray
        if ray is None:
            return
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self._owns_ray:
            try:
                ray.shutdown()
            except Exception:
                pass


# ------------------------------------------------------------------------------------------------
# The coordinator's processor


class RayProcessor:
    """Processor contract (``process``, ``rules_hash``, ``reload_rules``) for the daemon and catalog
    runs, backed by a :class:`RayPool`. Validates rules here (a bad edit is refused before any actor
    sees it), reads inputs, sends bytes, writes results. Models load only on the actors.

    ``concurrency`` tells callers how many images to keep in flight (the daemon runs that many
    dispatcher threads; catalog runs that many jobs at once)."""

    # Every image already runs in an actor process of its own: the daemon needs no isolated child.
    isolates = True

    def __init__(self, settings: Any, rules: Any = None, options: PoolOptions | None = None):
        self.settings = settings
        if isinstance(rules, RuleSet):
            self.rules = rules
        elif rules is not None:
            self.rules = load_rules(Path(rules), settings)
        else:
            self.rules = default_rules(settings)
        self.pool = RayPool(settings, options)
        self.sizing = self.pool.start(self.rules)
        self.concurrency = self.sizing.max_in_flight
        self.max_deaths = self.pool.opts.max_deaths

    @property
    def rules_hash(self) -> str:
        return self.rules.sha256

    def reload_rules(self, path: Path) -> str:
        """Validate and switch to the rules in ``path`` (tasks sent from now on carry them); on error
        raise and keep the current ones."""
        new = load_rules(path, self.settings)
        self.rules = new
        return new.sha256

    def process(self, path: Path, outbox: Path, *, sha256: str | None = None, stem: str | None = None,
                **options: Any) -> dict[str, Any]:
        """Same contract as :meth:`pipeline.run.process.Processor.process`: outputs written under
        ``outbox`` (here by the coordinator, record last), the record returned. An input that
        cannot be read gets its ``failed`` record here, as the local loader would give it."""
        path = Path(path)
        stem = stem or stem_for(path.name)
        rules = self.rules  # one snapshot for the whole image, even if an edit lands meanwhile
        try:
            data = read_file_bytes(path)
        except ImageLoadError as e:
            return write_failure(Path(outbox), stem, str(path), str(e),
                                 {**record_base(self.settings, rules), "stage": "load"})
        task = ImageTask(name=path.name, data=data, source=str(path), outbox=str(outbox), stem=stem, sha256=sha256,
                         options={k: v for k, v in options.items() if v is not None})
        result = self.pool.run(task, rules)
        write_result(result, Path(outbox))
        return result.record

    def describe(self) -> str:
        """One line for logs and the CLI: where the pool runs and how it is sized."""
        s = self.sizing
        hosts = sorted({w.get("host", "?") for w in self.pool.workers})
        return (f"Ray pool: {s.actors} actor(s) x ({s.cpus_per_actor:g} CPU, {s.gpus_per_actor:g} GPU) on "
                f"{', '.join(hosts) or '?'}; up to {s.max_in_flight} image(s) in flight")

    def drain(self) -> None:
        """The daemon is stopping: images not yet on an actor go back to the queue."""
        self.pool.drain()

    def close(self) -> None:
        self.pool.close()
