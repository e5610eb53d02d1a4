"""Stage 4, the readout: directions from activation statistics, their calibration, and the files vLLM loads.

Owns Contract 3 (``vectors.safetensors`` + ``manifest.json``): the files (:mod:`.manifest`), published
atomically as releases (:mod:`.publish`) and read back one consistent pair at a time (:mod:`.releases`).
Estimators and per-emotion statistics (:mod:`.estimators`, :mod:`.vectors`), the calibrated-score
metrics (:mod:`.metrics`), the per-token calibration (:mod:`.token_calibration`, :mod:`.folds`), the
conversation-level episode rule (:mod:`.episode`) and the runtime reference, the per-token readout a
ReadoutManager computes (:mod:`.runtime`).
"""
