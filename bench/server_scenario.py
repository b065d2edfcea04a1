"""MLPerf-style Server scenario for any backend: Poisson arrivals, a p99 bound, faults counted.

What a site asks before it points several scanners at one Triton server (what `perf_analyzer
--request-distribution=poisson` answers for Triton alone): at what request rate do answers still
come back within a bound, and does the service lose or change any of them?

* Arrivals are a Poisson process at the target rate (exponential gaps, seeded). N client threads,
  each with its own backend (a tritonclient object, like a TensorRT context, serves one caller at
  a time), take queries in arrival order. A query's latency runs from its scheduled arrival, not
  from when a client was free to send it, so a saturated service shows as latency instead of
  being hidden by a slower send rate (coordinated omission).
* A query asks for `met_logit` alone, as a classifier that predicts no masks does: the mask logits
  (256 KiB per node) are not sent back. Every answer is compared with a reference answer for its
  input; one further than `atol` counts as changed.
* A run is bounded: arrivals stop at `duration_s` once `min_queries` have arrived, and at
  `max_queries` or `max_duration_s` in any case; queries still unanswered `drain_s` after the
  last arrival are counted as failed.
* `find_max_rate` searches the highest rate whose p99 stays under a bound with nothing failed or
  changed, in a bounded number of runs (doubling, then bisection).

Retries. Inference is idempotent: the same inputs give the same outputs and a request changes
nothing on the server, so a request that failed because the service could not be reached (refused
or dropped connection, server unavailable or shutting down, model not loaded yet) is safe to send
again. It is retried at most `retries` times after a doubling backoff capped at `backoff_max_s`,
each time on a freshly opened backend: a new connection reaches a restarted server at once, where
an old gRPC channel may still wait out its reconnect backoff. Errors that would come back the same
(bad input, wrong I/O, an unknown tensor) are not retried. A request that still fails is reported
in one line and counted: sent = answered + failed in every run, checked before a result is
returned, so nothing is lost silently.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import numpy as np

from m2anet.bench.stats import summarize
from m2anet.engines import Backend

TRANSIENT_STATUS = frozenset(
    {
        "StatusCode.UNAVAILABLE",
        "StatusCode.DEADLINE_EXCEEDED",
        "StatusCode.ABORTED",
        "StatusCode.CANCELLED",
        "StatusCode.NOT_FOUND",
    }
)
"""gRPC codes (as tritonclient reports them) of a request the server did not run. NOT_FOUND is
among them because a restarted Triton opens its ports before it has loaded its models again, and
answers 'unknown model' until it has: a retry is bounded, so a name that is really wrong costs a
few backoffs, not a hang."""


@dataclass(frozen=True)
class ServerSettings:
    rate: float
    """Target arrivals per second."""
    clients: int = 4
    duration_s: float = 10.0
    min_queries: int = 50
    """A p99 over fewer queries is the worst one or two, whatever the rate."""
    max_queries: int = 2000
    max_duration_s: float = 60.0
    """Where `min_queries` would need longer at a low rate, the run stops here with fewer."""
    drain_s: float = 30.0
    timeout_ms: float = 1000.0
    """An answer later than this after its arrival is counted as a timeout (it still counts as answered)."""
    retries: int = 3
    backoff_s: float = 0.2
    backoff_max_s: float = 2.0
    atol: float = 1e-4
    """The FP32 tier's logit tolerance: a served model must answer as the artifact does."""
    seed: int = 0


@dataclass
class Query:
    index: int
    arrival_s: float
    input: int
    status: str = "pending"  # answered | failed
    latency_s: float | None = None
    attempts: int = 0
    changed: bool = False
    error: str | None = None


@dataclass
class ServerResult:
    settings: ServerSettings
    nodes_per_query: int
    sent: int
    answered: int
    failed: int
    timeouts: int
    changed: int
    retried: int
    """Queries answered after at least one retry."""
    wall_s: float
    achieved_rate: float
    """Answered queries per second, from the first arrival to the last answer."""
    latency_ms: dict[str, float] | None
    latency_per_node_ms: dict[str, float] | None
    failures: list[str]
    queries: list[Query] = field(repr=False)
    t0: float = 0.0
    """`time.perf_counter()` at arrival time 0: places outside events (a kill, a restart) among arrivals."""

    def held(self, p99_ms: float) -> bool:
        """The MLPerf Server criterion, plus the service's: none failed, none changed."""
        return (
            self.failed == 0
            and self.changed == 0
            and self.latency_ms is not None
            and self.latency_ms["p99"] <= p99_ms
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("queries")
        out.pop("t0")
        return out


def one_line(error: BaseException) -> str:
    if isinstance(error, _Opening):
        return f"reopening the backend: {error}"
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text[:200]}"


def is_transient(error: BaseException) -> bool:
    """The service did not complete the request (it was unreachable), so sending it again is safe."""
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    status = getattr(error, "status", None)  # tritonclient's InferenceServerException
    return callable(status) and str(status()) in TRANSIENT_STATUS


class _Opening(Exception):
    """A backend could not be (re)opened mid-run: the server is away, which a retry may outlast."""


def arrivals(settings: ServerSettings) -> np.ndarray:
    """Poisson arrival times (s): until `duration_s` once `min_queries` arrived; at most
    `max_queries` and `max_duration_s` (the first arrival always)."""
    rng = np.random.default_rng(settings.seed)
    times: list[float] = []
    t = 0.0
    while len(times) < settings.max_queries:
        t += rng.exponential(1.0 / settings.rate)
        if times and (
            t > settings.max_duration_s or (t > settings.duration_s and len(times) >= settings.min_queries)
        ):
            break
        times.append(t)
    return np.asarray(times)


def reference_answers(backend: Backend, inputs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """`met_logit` of each input, one at a time: the answers a loaded service must still give."""
    return [backend.infer(ct, mask, check=False, outputs=("met_logit",))[0] for ct, mask in inputs]


class _Client:
    """One client thread's backend, reopened after a transient failure."""

    def __init__(self, factory: Callable[[], Backend]) -> None:
        self.factory = factory
        self.backend: Backend | None = factory()

    def infer(self, ct: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.backend is None:
            try:
                self.backend = self.factory()
            except Exception as e:
                raise _Opening(one_line(e)) from e
        return self.backend.infer(ct, mask, check=False, outputs=("met_logit",))[0]

    def reset(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            with contextlib.suppress(Exception):  # one whose server died may fail to close; dropped anyway
                backend.close()


def run_server(
    factory: Callable[[], Backend],
    inputs: Sequence[tuple[np.ndarray, np.ndarray]],
    settings: ServerSettings,
    reference: Sequence[np.ndarray] | None = None,
    report: Callable[[str], None] | None = None,
) -> ServerResult:
    """One Server-scenario run at `settings.rate`; `factory` opens one backend per client.

    `inputs` are (ct, mask) batches of the same size; `reference` gives each one's expected
    `met_logit` (default: computed first on one of the clients' backends). Failed requests are
    passed to `report` (default: stderr) one line each as they happen.
    """
    if settings.rate <= 0 or settings.clients < 1 or not inputs:
        raise ValueError("the Server scenario needs a rate > 0, at least one client and one input")
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    clients = [_Client(factory) for _ in range(settings.clients)]
    if reference is None:
        reference = reference_answers(cast(Backend, clients[0].backend), inputs)  # opened just above
    for client in clients:  # the first query of a connection pays its setup: warm each one up
        client.infer(*inputs[0])
    times = arrivals(settings)
    rng = np.random.default_rng(settings.seed + 1)
    queries = [Query(i, float(t), int(rng.integers(len(inputs)))) for i, t in enumerate(times)]
    lock = threading.Lock()
    state = {"next": 0, "closed": False}
    start = time.perf_counter() + 0.05

    def worker(client: _Client) -> None:
        while True:
            with lock:
                if state["next"] >= len(queries) or state["closed"]:
                    return
                query = queries[state["next"]]
                state["next"] += 1
            delay = start + query.arrival_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ct, mask = inputs[query.input]
            answer, error = None, None
            for attempt in range(settings.retries + 1):
                query.attempts = attempt + 1
                try:
                    answer = client.infer(ct, mask)
                    break
                except Exception as e:
                    error = e
                    if not (isinstance(e, _Opening) or is_transient(e)) or attempt == settings.retries:
                        break
                    client.reset()
                    time.sleep(min(settings.backoff_s * 2**attempt, settings.backoff_max_s))
            done = time.perf_counter()
            with lock:
                if state["closed"]:  # answered after the drain deadline: already counted as failed
                    return
                if answer is not None:
                    query.status, query.latency_s = "answered", done - start - query.arrival_s
                    query.changed = not np.allclose(
                        answer, reference[query.input], rtol=0, atol=settings.atol
                    )
                else:
                    # no answer: every attempt raised, the last one's exception is `error`
                    query.status, query.error = "failed", one_line(cast(Exception, error))
                    report(
                        f"request {query.index} (arrival {query.arrival_s:.3f} s) failed after "
                        f"{query.attempts} attempt(s): {query.error}"
                    )

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    deadline = start + float(times[-1]) + settings.drain_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.perf_counter()))
    with lock:
        state["closed"] = True
        for query in queries:
            if query.status == "pending":
                query.status, query.error = (
                    "failed",
                    f"no answer {settings.drain_s:.0f} s after the last arrival",
                )
                report(f"request {query.index} (arrival {query.arrival_s:.3f} s) failed: {query.error}")
    for client, thread in zip(clients, threads, strict=True):
        if not thread.is_alive():  # closing a backend under a call still stuck in it is unsafe
            client.reset()
    return replace(_result(settings, queries, inputs[0][0].shape[0]), t0=start)


def _result(settings: ServerSettings, queries: list[Query], nodes: int) -> ServerResult:
    answered = [q for q in queries if q.status == "answered"]
    failed = [q for q in queries if q.status == "failed"]
    if len(answered) + len(failed) != len(queries):
        raise AssertionError(f"{len(queries)} sent but {len(answered)} answered and {len(failed)} failed")
    latencies = [q.latency_s for q in answered if q.latency_s is not None]
    ends = [q.arrival_s + q.latency_s for q in answered if q.latency_s is not None]
    wall = max(ends) - queries[0].arrival_s if ends else 0.0
    return ServerResult(
        settings=settings,
        nodes_per_query=nodes,
        sent=len(queries),
        answered=len(answered),
        failed=len(failed),
        timeouts=sum(1 for s in latencies if s * 1e3 > settings.timeout_ms),
        changed=sum(q.changed for q in answered),
        retried=sum(1 for q in answered if q.attempts > 1),
        wall_s=wall,
        achieved_rate=len(answered) / wall if wall > 0 else 0.0,
        latency_ms=summarize(latencies, 1e3) if latencies else None,
        latency_per_node_ms=summarize(latencies, 1e3 / nodes) if latencies else None,
        failures=[f"request {q.index}: {q.error}" for q in failed],
        queries=queries,
    )


@dataclass
class RateSearch:
    p99_ms: float
    best: ServerResult | None
    """The highest rate that held; None when even the first did not."""
    runs: list[ServerResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "p99_ms": self.p99_ms,
            "rate_held": self.best.settings.rate if self.best else None,
            "best": self.best.to_dict() if self.best else None,
            "runs": [r.to_dict() for r in self.runs],
        }


def find_max_rate(
    factory: Callable[[], Backend],
    inputs: Sequence[tuple[np.ndarray, np.ndarray]],
    settings: ServerSettings,
    p99_ms: float,
    *,
    max_runs: int = 6,
    reference: Sequence[np.ndarray] | None = None,
    report: Callable[[str], None] | None = None,
) -> RateSearch:
    """Highest rate (from `settings.rate`) whose p99 stays under `p99_ms` with nothing failed or
    changed: double while it holds, then bisect between the last rate held and the first missed;
    `max_runs` runs at most."""
    if reference is None:
        with factory() as backend:
            reference = reference_answers(backend, inputs)
    runs: list[ServerResult] = []
    held: ServerResult | None = None
    missed: float | None = None
    rate = settings.rate
    while len(runs) < max_runs:
        result = run_server(factory, inputs, replace(settings, rate=rate), reference, report)
        runs.append(result)
        if result.held(p99_ms):
            held = result
            rate = rate * 2 if missed is None else (rate + missed) / 2
        else:
            missed = rate
            rate = rate / 2 if held is None else (held.settings.rate + rate) / 2
        rate = float(f"{rate:.3g}")  # a rate to quote, not 5.425000000000001
    return RateSearch(p99_ms=p99_ms, best=held, runs=runs)
