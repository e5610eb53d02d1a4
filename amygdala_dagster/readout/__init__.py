"""Stage 4, the readout: directions from activation statistics, their calibration, and the files vLLM loads.

Owns Contract 3 (``vectors.safetensors`` + ``manifest.json``: :mod:`.manifest`, published
atomically by :mod:`.publish`). Estimators and per-emotion statistics (:mod:`.estimators`,
:mod:`.vectors`), the calibrated-score metrics (:mod:`.metrics`), the per-token calibration
(:mod:`.token_calibration`) and the runtime reference, the per-token readout a ReadoutManager
computes (:mod:`.runtime`).
"""
