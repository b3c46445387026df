"""The composition root: wires the layers into processes. Nothing imports it."""
