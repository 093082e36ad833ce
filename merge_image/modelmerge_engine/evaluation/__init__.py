"""Evaluation of a model with merging-eval's metric: token-weighted cross-entropy of the answers of
chat-templated instruction/answer records (`modelmerge eval`).

It needs torch and transformers, which the CPU merge image does not carry, so nothing on the merge path imports
this package: `data` (reading and checking data files) imports neither, `loading` and `metric` import them
lazily. The entry points are `data.load_data_files`, `run.evaluate` (a report as a dict) and `run.run_eval`
(the command line)."""
