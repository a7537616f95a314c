"""Data: where the reference data lives and text windows (corpus), tokenizer helpers (tokens),
MMLU and GSM8K (tasks), the synthetic tasks (synthetic) and the calibration sets by name
(calibration).
"""
