"""Seed step 2 (``python -m amygdala_dagster.train_steering_vectors``).

See :mod:`amygdala_dagster.commands.train_steering_vectors`.
"""

from amygdala_dagster.commands.train_steering_vectors import main

if __name__ == "__main__":
    raise SystemExit(main())
