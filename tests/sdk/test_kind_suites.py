"""The SDK's suites for the non-model plugin kinds, run on the first-party plugins of each kind."""

from __future__ import annotations

from difforge_sdk.testing import AttentionConformance, CacheConformance, OffloadConformance, SchedulerConformance


class TestSDPA(AttentionConformance):
    backend = "sdpa"


class TestFlowUniPC(SchedulerConformance):
    scheduler = "flow-unipc"
    options = {"shift": 3.0}


class TestSequentialOffload(OffloadConformance):
    offload = "sequential"


class TestFp8(OffloadConformance):
    offload = "fp8-scaled"
    tolerance = 0.02  # difforge-fp8 states 1% on this pipeline


class TestFBCache(CacheConformance):
    cache = "fbcache"
    options = {"threshold": 0.2}

