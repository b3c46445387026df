"""The contract: events, commands, DTOs and subject names. Imports nothing of ours."""
