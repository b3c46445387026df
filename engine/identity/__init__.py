"""Users, passwords, sessions and API keys: pure deciders, with the stores at the edges."""
