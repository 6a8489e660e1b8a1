"""Prometheus metrics of the rerank server (`prometheus-client`, one registry per server).

Names follow text-embeddings-inference's where one exists (``te_request_count`` -> ``kalm_request_count``):

  kalm_request_count{route, status}         requests answered
  kalm_request_duration_seconds{route}      latency of answered requests (histogram)
  kalm_requests_in_flight                   requests holding a concurrency slot
  kalm_queue_size                           work items (documents to encode, pairs to score) waiting
  kalm_batch_size{kind}                     items per engine call (kind: encode | score; histogram)
  kalm_batch_rows{kind}                     padded rows per engine call (fixed by the call's shape)
  kalm_batch_tokens{kind}                   real tokens per engine call (histogram)
  kalm_batch_requests{kind}                 distinct requests sharing an engine call (histogram)
  kalm_pairs_scored_total, kalm_documents_encoded_total
  kalm_cache_hits_total{tier}, kalm_cache_misses_total, kalm_cache_evictions_total
  kalm_cache_entries{tier}, kalm_cache_bytes{tier}   (tier: device | host | disk | slabs)
  kalm_compiled_programs                    programs the engine has compiled (bounded by the shape buckets)
  kalm_batch_shapes                         distinct (kind, shape) keys the batcher has run
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Live:
    """Collects the values read at scrape time from the service (cache tiers, compiles, queue)."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        s = self.service
        cache = s.cache.stats()
        entries = GaugeMetricFamily("kalm_cache_entries", "registered passages per tier", labels=["tier"])
        for tier, n in cache["entries"].items():
            entries.add_metric([tier], n)
        yield entries
        nbytes = GaugeMetricFamily("kalm_cache_bytes", "passage-state bytes per tier", labels=["tier"])
        for tier, n in cache["bytes"].items():
            nbytes.add_metric([tier], n)
        yield nbytes
        hits = CounterMetricFamily("kalm_cache_hits", "passage ids found, by tier", labels=["tier"])
        for tier, n in s.cache.hits.items():
            hits.add_metric([tier], n)
        yield hits
        yield CounterMetricFamily("kalm_cache_misses", "passage ids not registered", value=s.cache.misses)
        yield CounterMetricFamily(
            "kalm_cache_evictions", "passages forgotten for the host budget", value=s.cache.evictions
        )
        yield GaugeMetricFamily("kalm_compiled_programs", "programs the engine compiled", value=s.engine.compiles)
        yield GaugeMetricFamily("kalm_batch_shapes", "distinct batch shapes run", value=len(s.batcher.shapes))
        yield GaugeMetricFamily("kalm_queue_size", "work items waiting for the engine", value=s.batcher.queued)
        yield GaugeMetricFamily("kalm_requests_in_flight", "requests holding a slot", value=s.in_flight)


class Metrics:
    """The server's instruments, in their own registry (several servers in one process never collide)."""

    def __init__(self, service=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kalm_request_count", "requests answered", ["route", "status"], registry=r)
        self.duration = Histogram(
            "kalm_request_duration_seconds", "request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "kalm_batch_size", "items per engine call", ["kind"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "kalm_batch_rows", "padded rows per engine call", ["kind"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "kalm_batch_tokens", "real tokens per engine call", ["kind"], buckets=TOKEN_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "kalm_batch_requests", "requests sharing an engine call", ["kind"], buckets=SIZE_BUCKETS, registry=r
        )
        self.pairs = Counter("kalm_pairs_scored", "(prompt, passage) pairs scored", registry=r)
        self.documents = Counter("kalm_documents_encoded", "documents encoded", registry=r)
        if service is not None:
            r.register(_Live(service))

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
