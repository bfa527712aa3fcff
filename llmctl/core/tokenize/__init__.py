"""Tokenizers: applying one to records (``apply``); training them comes with ``tokenize-train``."""
