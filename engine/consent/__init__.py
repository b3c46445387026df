"""Consent = verified control of a domain (DESIGN §8): a pure decider, the service that
loads, decides and appends, and the well-known check that fetches the token."""

from engine.consent.service import ConsentCommands

__all__ = ["ConsentCommands"]
