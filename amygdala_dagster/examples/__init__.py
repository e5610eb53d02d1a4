"""Stage 2, training examples: which emotions qualify and each emotion's positives, negatives and split.

Owns Contract 2 (the training-examples directory). Reads the graph stage's snapshot; knows nothing of models.
"""
