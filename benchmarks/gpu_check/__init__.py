"""The GPU check of ``benchmarks/gpu_check.py`` (issue 28, item 11), split by concern:

- :mod:`.common`: sizes (full and ``--tiny``), paths, the synthetic tokenizer and texts, result
  files, process trees;
- :mod:`.driver`: the command line, one child process per part under its own timeout and a
  total budget, the table (Markdown and JSON);
- :mod:`.setup_parts`: ``env`` (versions, devices, the measured matmul rate) and ``prepare``
  (tokenizer, random Llama, LLaRA shards, fine-tuning negatives);
- :mod:`.training`: ``llara`` (step time, memory, MFU), ``resume`` (kill at step 5, resume to
  10) and ``lora`` (fine-tuning memory, merged vs unmerged), all through ``llmret.launch``;
- :mod:`.kernels`: ``csplade`` (forward + backward), ``encode`` (texts/s) and ``search``.

How to run it on a lent GPU: docs/gpu_check.md.
"""
