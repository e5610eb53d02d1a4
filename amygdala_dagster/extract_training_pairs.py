"""Seed step 1 (``python -m amygdala_dagster.extract_training_pairs``).

See :mod:`amygdala_dagster.commands.extract_training_pairs`.
"""

from amygdala_dagster.commands.extract_training_pairs import main

if __name__ == "__main__":
    raise SystemExit(main())
