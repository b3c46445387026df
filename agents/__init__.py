"""Runner agents: pull flows from the dispatch queues and run them in real Chromium."""
