"""Project-wide pytest setup: tiers by hardware, offline Hugging Face."""

import os

# Nothing in this project downloads a model; fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
