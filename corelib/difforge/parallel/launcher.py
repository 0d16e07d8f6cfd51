"""``ParallelPipeline``: the parent's handle on N spawned worker processes, one per rank.

Each worker initialises ``torch.distributed`` (gloo on CPU, nccl on CUDA; rendezvous on a free
localhost port), binds rank ``r`` to ``cuda:r`` (or the CPU), builds the same pipeline from the same
arguments and serves calls. Messages are pickled bytes over a pipe per worker; a call goes to every
rank and the parent returns rank 0's result. A worker's exception comes back with its traceback and
is raised in the parent; a worker that dies (or a collective that never completes because a peer
failed) stops all workers instead of hanging the parent.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import pickle
import socket
import time
import traceback
import weakref
from multiprocessing.connection import wait
from typing import Any

import torch

from ..errors import ConfigError, DifforgeError
from .layout import ParallelLayout

log = logging.getLogger(__name__)

__all__ = ["ParallelPipeline", "ParallelWorkerError"]

#: how long the others may take to answer once one worker has failed, before all are stopped
ERROR_GRACE_S = 10.0
#: how long close() waits for workers to exit before terminating them
CLOSE_TIMEOUT_S = 10.0



class ParallelWorkerError(DifforgeError):
    """A parallel worker failed (an exception, or the process died)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _plugin_setup() -> tuple[Any, list[str]]:
    """The parent's plugin settings and manually registered plugin modules, for the workers' registries."""
    from ..plugins import get_plugin_host

    host = get_plugin_host()
    manual = [r.module for r in host.records.values() if r.source == "manual" and r.status == "ok"]
    return host.settings, manual


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _error_payload(rank: int, exc: BaseException) -> dict[str, Any]:
    return {
        "rank": rank,
        "module": type(exc).__module__,
        "type": type(exc).__qualname__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def _raise_from(payload: dict[str, Any], note: str = "") -> None:
    """Raise a worker's error in the parent: its DifforgeError class where it has one, else ParallelWorkerError."""
    where = f"parallel worker rank {payload['rank']}"
    tb = payload["traceback"].rstrip()
    cls: Any = None
    try:
        candidate = getattr(importlib.import_module(payload["module"]), payload["type"].split(".")[-1], None)
        if isinstance(candidate, type) and issubclass(candidate, DifforgeError):
            cls = candidate
    except Exception:  # noqa: BLE001 - an unknown class falls back to ParallelWorkerError
        cls = None
    if cls is not None:
        try:
            err = cls(f"{payload['message']} (raised on {where}{note})\n\nworker traceback:\n{tb}")
        except Exception:  # noqa: BLE001 - a subclass with another constructor
            err = None
        if err is not None:
            raise err
    raise ParallelWorkerError(
        f"{where} raised {payload['type']}: {payload['message']}{note}. Fix the cause shown in the worker "
        f"traceback below (it ran the same call as the parent asked).\n\nworker traceback:\n{tb}"
    )


# ---------------------------------------------------------------- the worker


def _worker_main(
    rank: int, layout: ParallelLayout, port: int, device_type: str, plugins: tuple[Any, list[str]],
    name: str, kwargs: dict[str, Any], conn: Any,
) -> None:
    import torch.distributed as dist

    from ..plugins import reload_plugins
    from ..runtime.pipeline import Pipeline
    from .state import attach, init_state

    def send(obj: Any) -> None:
        conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    world = layout.world_size
    try:
        if device_type == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        settings, manual = plugins
        reload_plugins(settings, plugins=[importlib.import_module(m) for m in manual])
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
            rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30),
        )
        state = init_state(layout, device)
        pipe = Pipeline.from_pretrained(name, **kwargs, device=str(device))
        attach(pipe, state)
        send(("ok", None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops everyone
        send(("error", _error_payload(rank, exc)))
        return
    try:
        while True:
            try:
                method, args, kw = pickle.loads(conn.recv_bytes())
            except EOFError:
                break
            if method == "close":
                break
            try:
                if method == "__call__":
                    if rank != 0:
                        kw["progress_bar_cmd"] = lambda it, **_: it
                    result = pipe(*args, **kw)
                elif method == "set_call_defaults":
                    pipe.call_defaults = dict(args[0])
                    result = None
                else:
                    result = getattr(pipe, method)(*args, **kw)
                send(("ok", _to_cpu(result) if rank == 0 else None))
            except BaseException as exc:  # noqa: BLE001
                send(("error", _error_payload(rank, exc)))
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
        conn.close()


# ---------------------------------------------------------------- the parent


def _shutdown(processes: list[Any], conns: list[Any]) -> None:
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps(("close", (), {})))
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(5.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)
    for conn in conns:
        conn.close()


class ParallelPipeline:
    """A pipeline run by ``layout.world_size`` worker processes; used like a :class:`~difforge.Pipeline`.

    Calling it runs the call on every rank and returns rank 0's result. ``set_cache``,
    ``set_attention``, ``set_offload``, ``set_scheduler``, ``load_lora``, ``clear_lora`` and
    ``set_lora_scale`` apply on every rank. :meth:`close` (or leaving a ``with`` block, or the end of
    the program) stops the workers.
    """

    def __init__(self, name: str, layout: ParallelLayout, device: torch.device, kwargs: dict[str, Any]) -> None:
        import torch.multiprocessing as mp

        self.name = name
        self.layout = layout
        self.device = device
        self._call_defaults: dict[str, Any] = {}
        ctx = mp.get_context("spawn")
        port = _free_port()
        plugins = _plugin_setup()
        self._conns: list[Any] = []
        self.processes: list[Any] = []
        for rank in range(layout.world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(rank, layout, port, device.type, plugins, name, kwargs, child),
                name=f"difforge-parallel-{rank}", daemon=True,
            )
            proc.start()
            child.close()
            self._conns.append(parent)
            self.processes.append(proc)
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self.processes, self._conns)
        log.info("started %d workers for %s (%s)", layout.world_size, name, layout.describe())
        self._exchange(None)  # wait until every rank has built its pipeline

    # -- plumbing

    def _exchange(self, message: tuple[str, tuple[Any, ...], dict[str, Any]] | None) -> Any:
        if self._closed:
            raise ParallelWorkerError(
                "this ParallelPipeline is closed (close() was called, or a worker failed); build a new one"
            )
        if message is not None:
            try:
                data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # noqa: BLE001 - lambdas, open files, ...
                raise ConfigError(
                    f"{message[0]}: an argument cannot be sent to the worker processes ({exc}); pass plain values "
                    "(callbacks and progress bars do not cross processes: run under torchrun to use them)"
                ) from exc
            for conn in self._conns:
                conn.send_bytes(data)
        replies: dict[int, Any] = {}
        first_error: dict[str, Any] | None = None
        deadline: float | None = None
        pending = set(range(len(self.processes)))
        while pending:
            by_conn = {self._conns[r]: r for r in pending}
            by_sentinel = {self.processes[r].sentinel: r for r in pending}
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait(list(by_conn) + list(by_sentinel), timeout=timeout)
            if not ready:  # peers of a failed worker stuck in a collective
                self._fail()
                assert first_error is not None
                _raise_from(first_error, "; the other workers did not finish and were stopped")
            for obj in ready:
                r = by_conn[obj] if obj in by_conn else by_sentinel[obj]
                if r not in pending:
                    continue
                reply = None
                if self._conns[r].poll():
                    try:
                        reply = pickle.loads(self._conns[r].recv_bytes())
                    except (EOFError, OSError):
                        reply = None  # the pipe closed: the worker is gone
                if reply is None:
                    if obj in by_conn or not self.processes[r].is_alive():
                        self.processes[r].join(1.0)
                        code = self.processes[r].exitcode
                        self._fail()
                        if first_error is not None:
                            _raise_from(first_error)
                        raise ParallelWorkerError(
                            f"parallel worker rank {r} died (exit code {code}) without answering; all workers were "
                            "stopped. Look at its output above (out of memory? a crash in a native library?) "
                            "and build a new pipeline"
                        )
                    continue
                pending.discard(r)
                status, value = reply
                if status == "error":
                    if first_error is None:
                        first_error = value
                        deadline = time.monotonic() + ERROR_GRACE_S
                else:
                    replies[r] = value
        if first_error is not None:
            _raise_from(first_error)
        return replies.get(0)

    def _fail(self) -> None:
        self._closed = True
        self._finalizer()

    def _forward(self, method: str, *args: Any, **kw: Any) -> Any:
        return self._exchange((method, args, kw))

    # -- the Pipeline surface

    def __call__(self, *args: Any, **kw: Any) -> Any:
        """Generate on every rank; returns rank 0's result. Without ``seed`` (and ``latents``) the parent
        draws one, so that every rank starts from the same noise."""
        if kw.get("seed") is None and kw.get("latents") is None and "seed" not in self._call_defaults:
            kw["seed"] = int(torch.seed() % (2**62))
        return self._forward("__call__", *args, **kw)

    def set_cache(self, cache: Any) -> None:
        self._forward("set_cache", cache)

    def set_attention(self, attention: Any) -> None:
        self._forward("set_attention", attention)

    def set_offload(self, offload: Any) -> None:
        self._forward("set_offload", offload)

    def set_scheduler(self, scheduler: Any = None) -> None:
        self._forward("set_scheduler", scheduler)

    def load_lora(self, lora: Any, scale: float = 1.0, **kw: Any) -> str:
        return self._forward("load_lora", lora, scale, **kw)

    def clear_lora(self, name: str | None = None) -> None:
        self._forward("clear_lora", name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        self._forward("set_lora_scale", name, scale)

    def cache_stats(self) -> list[Any]:
        """Rank 0's cache statistics."""
        return self._forward("cache_stats")

    @property
    def call_defaults(self) -> dict[str, Any]:
        return dict(self._call_defaults)

    @call_defaults.setter
    def call_defaults(self, value: dict[str, Any]) -> None:
        self._forward("set_call_defaults", dict(value))
        self._call_defaults = dict(value)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> ParallelPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running"
        return f"ParallelPipeline({self.name!r}, {self.layout.describe()}, {self.device.type}, {state})"
