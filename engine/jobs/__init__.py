"""The job aggregate: pure decider and the command service around it."""
