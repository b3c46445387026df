"""Egress held at the network layer: the runner's proxy and its allow rule."""
