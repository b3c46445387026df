"""Dispatcher: what runs next (pure planning) and the loop that publishes it."""
