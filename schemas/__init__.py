"""The contract: events, commands, DTOs and subject names. Imports nothing of ours."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("trafficbuster")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0"
