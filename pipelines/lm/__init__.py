"""The offline language-model pipeline: an English corpus from the Python stdlib's own prose, a
byte-level BPE tokenizer, token datasets, a small causal Transformer teacher and student.

    python -m pipelines.lm.prepare        # corpus, tokenizer, token arrays, teacher → runs/lm
"""
