"""Measurements of students against their teacher: fidelity and task metrics (`evaluate`), per-site and
per-layer similarity (`similarity`: linear CKA, token-similarity matrices), and CPU timing (`timing`)."""
