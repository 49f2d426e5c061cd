"""What STRIDE reads: training pools and queries (``pools``, ``records``), the planted facts of
the built-in pool (``facts``), tokenisation (``tokenize``) and models (``models``)."""
