"""replab: a representation-learning lab on Ray (self-supervised and semi-supervised vision at scale)."""

__version__ = "0.1.0"
