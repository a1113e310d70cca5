"""``python -m cb_lab serve``: the engine behind an OpenAI-compatible HTTP API.

::

    python -m cb_lab serve                       # SmolLM2-135M-Instruct when installed, on 127.0.0.1:8000
    python -m cb_lab serve --model random        # seeded random weights, byte tokenizer: starts in a second
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 8}'

Any OpenAI client works (``openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")``).
The parts, each in its own file: ``protocol`` (request bodies), ``wire`` (response bodies and
stream chunks), ``app`` (the routes), ``metrics`` (Prometheus), ``cli`` (the command and
``start_server``, which serves from a background thread: tests, notebooks).
"""

from cb_lab.server.app import build_app
from cb_lab.server.cli import RunningServer, serve_main, start_server

__all__ = ["RunningServer", "build_app", "serve_main", "start_server"]
