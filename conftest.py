"""For every test: nothing reaches the Hugging Face Hub (set before anything imports huggingface_hub).

A test that exercises downloads points the hub client at a local hub of its own instead.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
