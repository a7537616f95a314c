"""Evaluation: perplexity and KL with bootstrap intervals (lm), teacher-forced scoring and greedy
generation (continuation), MMLU and GSM8K (mmlu_gsm8k), the synthetic tasks (synthetic), and any
lm-evaluation-harness task through lm-eval itself (harness, with its task configs in harness_tasks/).
"""
