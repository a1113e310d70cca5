"""Watch it live: a browser page that draws every step of the engine as it happens.

- ``recorder``: :class:`LiveTracePlugin`, the per-step trace as one small JSON object per step;
- ``hub``: :class:`StepHub`, which fans each step out to the pages through bounded queues
  (the engine thread never waits for a browser) and keeps a window of recent steps;
- ``routes``: the page (``/``, ``/dashboard``), its event stream (``/events``) and ``/trace``;
- ``dashboard.html``: the page itself, one self-contained file;
- ``simulation``: the same page over a simulated run (``python -m cb_lab simulate --live``).

``python -m cb_lab serve`` adds the routes to the OpenAI-compatible server.
"""
