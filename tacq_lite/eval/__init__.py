"""Evaluation: perplexity and KL with bootstrap intervals (lm), teacher-forced scoring and greedy
generation (continuation), MMLU and GSM8K (mmlu_gsm8k), the synthetic tasks (synthetic).
"""
