"""Stage 2, training examples: which emotions qualify and each emotion's positives, negatives and split.

Owns Contract 2, the training-examples directory: the selection rules (:mod:`.selection`), which emotions
are candidates and qualify (:mod:`.catalog`), the directory written and read (:mod:`.directory`). Reads
the graph stage's snapshot; knows nothing of models.
"""
