"""Backbones (encoders) and the MLP heads the methods put on them."""
