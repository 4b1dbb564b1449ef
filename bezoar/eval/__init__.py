"""bezoar.eval: what every checkpoint is checked with.

- ``bezoar.eval.harness``: the ``bezoar`` model for lm-evaluation-harness (registered on import)
  and the Open LLM Leaderboard v1 preset;
- ``bezoar.eval.mt_bench``: MT-Bench answers and single-answer grading by an LLM judge through
  the client pool;
- ``bezoar.eval.chat``: chat messages as OpenBezoar prompt text (shared with ``bezoar.serve``);
- ``bezoar.eval.scoring`` / ``bezoar.eval.decoding``: token log-probabilities and stop strings,
  shared by the harness model and the server.

Command line: ``python -m bezoar.eval harness ...`` and ``python -m bezoar.eval mt-bench ...``.
"""
