"""Upstream proxies (DESIGN §4): registration, the pool a job draws candidates from, and
health (failures mark a proxy bad, a check after the cool-down restores it)."""
