"""Stage 5, evaluation of readout vectors: do they read what they claim, per text and per token?

Works on arrays the GPU step wrote (pooled activations in the cache, per-token samples); loads no model.
Owns ``report/evaluation.json`` and ``evaluation.html`` (the report) and ``trace.json``/``trace.html``
(``amygdala trace``). The metrics themselves are :mod:`amygdala_dagster.readout.metrics`.

- :mod:`.core`: :func:`~.core.evaluate`, the whole evaluation (held-out separation, calibration, estimator
  comparison, cross-talk), reading activations from the cache;
- :mod:`.confounds`: trivial baselines (text length, node type); :mod:`.layer_sweep`: the layer sweep;
- :mod:`.verdicts`: the one source of per-emotion verdicts and flags (use / weak / do not use);
- :mod:`.generalisation`: the out-of-distribution snippets each vector scores highest and lowest;
- :mod:`.conversations`: the runtime section, labelled conversations read per token and by the episode rule
  (:mod:`.runtime_report` draws it);
- :mod:`.report` with :mod:`.plots`: the HTML report and its PNG plots (matplotlib imported when drawing);
- :mod:`.trace`: per-token trace records and the trace page;
- :mod:`.html`: the one Jinja2 environment both pages render through (templates in ``templates/``).
"""
