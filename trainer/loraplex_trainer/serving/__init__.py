"""Serving what is promoted: vLLM's OpenAI-compatible server behind a proxy that follows the promoted map.

One serving process (``loraplex serving`` in a pool's serving pod, ``loraplex serve RUN_DIR`` on
a laptop):

- starts ``vllm serve`` as a child on 127.0.0.1 with LoRA and runtime LoRA loading on. vLLM's
  load and unload endpoints have no authentication, so only this process can reach them;
- answers on the public port itself. ``POST /v1/completions`` and ``/v1/chat/completions``
  (streaming too) go to vLLM with ``model`` rewritten from the experiment's name to the name
  vLLM holds that revision under (``<experiment>@<revision>``; responses carry that name, so a
  client sees which revision answered); the base model's name passes as it is; any other name
  is a 404 that names it. ``GET /v1/models`` lists the base and the served experiments,
  ``/loraplex/served`` what is served since when, ``/health`` and ``/ready``. Nothing else of
  vLLM is reachable;
- every ``interval`` seconds reads the promoted map (experiment -> checkpoint URI) from its
  source: the pool's promoted-adapters ConfigMap through the API, or a run folder. A changed
  revision is loaded under its own versioned name, the route switches to it, and only then is
  the old version unloaded: nothing in flight fails and no request finds a gap. A rollback
  loads the old checkpoint again under its own name (vLLM gives every load a new LoRA id, so no
  cached copy of other weights answers). An experiment no longer in the map is unloaded.
"""

from .commands import run_local, run_pod
from .errors import ServingError
from .proxy import FORWARDED, SESSION, build_app, serve
from .router import Router, Served
from .sources import (
    ConfigMapFolderSource,
    ConfigMapSource,
    PromotedSource,
    RunDirSource,
    local_path,
    revision_of,
    stage_adapter,
)
from .vllm_server import VLLMServer, free_port, wait_for_vllm

__all__ = [
    "FORWARDED", "SESSION", "ConfigMapFolderSource", "ConfigMapSource", "PromotedSource", "Router",
    "RunDirSource", "Served", "ServingError", "VLLMServer", "build_app", "free_port", "local_path",
    "revision_of", "run_local", "run_pod", "serve", "stage_adapter", "wait_for_vllm",
]  # fmt: skip
