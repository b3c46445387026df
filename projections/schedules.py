"""Read model of schedules (DESIGN §9): the tables, ready for the schedule events
(``tb.schedule.<id>.*``: ScheduleCreated, ScheduleUpdated, SchedulePaused,
ScheduleResumed, ScheduleDeleted, ScheduleFired, ScheduleSkipped). Until those exist
nothing writes here.

``kind`` is cron, interval or once and ``spec`` its expression in that kind (a cron
line, seconds, a time); ``job`` is the job a fire creates, as JSON. Each fire and each
skip (with the guard's reason) is a row of ``schedule_fires``.
"""

from __future__ import annotations

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS schedules (
        schedule_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        spec TEXT NOT NULL,
        timezone TEXT NOT NULL,
        job TEXT NOT NULL,
        status TEXT NOT NULL,
        fires INTEGER NOT NULL DEFAULT 0,
        skips INTEGER NOT NULL DEFAULT 0,
        last_fired_at TEXT,
        last_job_id TEXT,
        last_skip_reason TEXT,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        last_seq INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS schedules_by_status ON schedules (status, schedule_id)",
    """CREATE TABLE IF NOT EXISTS schedule_fires (
        schedule_id TEXT NOT NULL,
        fire_time TEXT NOT NULL,
        outcome TEXT NOT NULL,
        job_id TEXT,
        reason TEXT,
        at TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (schedule_id, fire_time)
    )""",
)
