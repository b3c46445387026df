"""The write side: bus, pure deciders, dispatcher, consent verification."""
