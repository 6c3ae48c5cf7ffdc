"""Request histograms and recycle counts the supervisor keeps, for `status` and `/metrics`.

Plain Python with fixed buckets (no metrics library in the supervisor): the HTTP gateway turns a
snapshot into Prometheus families. Latency runs from acceptance to reply; queue time from
acceptance to the first dispatch.
"""

import bisect
import collections

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = SECONDS_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one counts what exceeds every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def snapshot(self) -> dict:
        """Cumulative counts per upper bound, as Prometheus has them (the last bound is "+Inf")."""
        cumulative, running = [], 0
        for bound, count in zip((*self.buckets, "+Inf"), self.counts):
            running += count
            cumulative.append([bound, running])
        return {"buckets": cumulative, "sum": self.sum, "count": running}


class Metrics:
    def __init__(self) -> None:
        self.latency = Histogram()
        self.queue_time = Histogram()
        self.recycles: collections.Counter = collections.Counter()  # by reason

    def snapshot(self) -> dict:
        return {"latency_seconds": self.latency.snapshot(), "queue_seconds": self.queue_time.snapshot(),
                "recycles": dict(self.recycles)}
