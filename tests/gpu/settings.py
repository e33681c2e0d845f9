"""Settings of the GPU tier's tests, from the environment (conftest.py)."""

from __future__ import annotations

import os

import servers
import workload

SITE = os.environ.get("GPU_TIER_SITE") or None
DTYPE = os.environ.get("GPU_TIER_DTYPE", "float16")
TIMEOUT = float(os.environ.get("GPU_TIER_TIMEOUT", "60"))
MODES = servers.parse_modes(os.environ.get("GPU_TIER_MODE", servers.DEFAULT_MODE))
REQUESTS = workload.build_requests(16)
