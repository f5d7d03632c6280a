"""Self-supervised methods, one file each; see :mod:`replab.methods.base` for the interface."""
