"""The training workflow, without Dagster: what the seed scripts, the ``amygdala`` commands and the assets share.
"""
