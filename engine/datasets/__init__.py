"""Datasets (DESIGN §8): the owner's aggregate, immutable versions in the object store,
chunked uploads, and the streaming parsers that turn operators' files into rows."""
