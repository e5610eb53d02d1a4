"""The training workflow, without Dagster: what the seed scripts, the ``amygdala`` commands and the assets share.

The one layer that reads the ``AMYGDALA_*`` environment (:mod:`.settings`) and the one place that puts the
stages below together, so that the commands and the assets call it instead of re-assembling them:

- :mod:`.settings`: the ``AMYGDALA_*`` environment, read once, with its bounds;
- :mod:`.engine_settings`: settings -> engine (:class:`~.engine_settings.EngineSettings`, ``build_engine``);
- :mod:`.layout`: the artefact layout under an output directory, and every output checked writable;
- :mod:`.partitions`: the texts of a set of emotions, trainability, qualification, the partition plan;
- :mod:`.staging`: what is staged between steps and the rules that decide whether it is current;
- :mod:`.samples`: a run's per-token samples (calibration, evaluation conversations);
- :mod:`.training`: the seed's step 2, an examples directory -> the vectors + manifest pair.

Nothing here imports :mod:`amygdala_dagster.commands` or :mod:`amygdala_dagster.pipeline`.
"""
