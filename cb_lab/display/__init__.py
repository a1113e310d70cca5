"""cb-lab in a notebook: every object a learner inspects shows itself as HTML.

Jupyter calls ``_repr_html_`` to show the value of a cell. The core objects (``Request``,
``StepPlan``, the stats ``Scheduler.step`` returns, a ``RaggedBatch``, the KV caches and the
``BlockPool``, the ``Scheduler``, a ``MetricsCollector``, a serving ``RunResult``, the
``LLMEngine`` and its ``EngineConfig`` and ``SamplingParams``) define it by calling the
function of :mod:`cb_lab.display.views` that draws them, built from the
pieces in :mod:`cb_lab.display.markup`. Plain ``repr`` stays the text everywhere else.
"""

from cb_lab.display import views as _views  # noqa: F401  (loading it registers every view)

__all__: list[str] = []
