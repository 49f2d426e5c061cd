"""The four STRIDE stages, one module each: ``subsets`` (stage 1), ``operators`` + ``frozen`` +
``training`` (stage 2, fit once), ``measurement`` (stage 3) and ``recovery`` (stage 4)."""
